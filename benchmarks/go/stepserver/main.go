// Command stepserver is the benchmark's step-runner stand-in: a grpc-go StepRunner
// server on a unix socket that does no work of its own, so that whatever the
// benchmark measures is the cost of the path in front of it.
//
// A job's RunRequest.env scripts what its calls return, the way a real job's script
// decides its outcome: SCENARIO picks the Status answer, LOG_BYTES and LOG_CHUNK
// the log FollowLogs streams.
//
// Installed in a container image as gitlab-runner-helper it also has the two
// subcommands GitLab Runner's Docker executor uses (steps.go in this package):
//
//	steps serve [--socket P]   the build container's main process
//	steps proxy [--socket P]   one exec session per gRPC connection
package main

import (
	"context"
	"errors"
	"flag"
	"log"
	"net"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	pb "gitlab.com/gitlab-org/step-runner/proto"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
)

const logLine = "job log: deterministic test line 0123456789abcdef\n"

type job struct {
	scenario  string
	logBytes  int64
	logChunk  int
	started   time.Time
	cancelled bool
}

type server struct {
	pb.UnimplementedStepRunnerServer
	mu   sync.Mutex
	jobs map[string]*job
	// One log-sized buffer shared by every stream: messages are slices of it, so
	// producing a log costs the server no copying of its own.
	logData []byte
}

func newServer(maxChunk int) *server {
	data := make([]byte, 0, maxChunk+len(logLine))
	for len(data) < maxChunk {
		data = append(data, logLine...)
	}
	return &server{jobs: make(map[string]*job), logData: data[:maxChunk]}
}

// lookup returns a copy, so handlers read a job without holding the lock.
func (s *server) lookup(id string) (job, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	j, ok := s.jobs[id]
	if !ok {
		return job{}, status.Errorf(codes.NotFound, "job %q not found", id)
	}
	return *j, nil
}

func envInt(env map[string]string, key string, fallback int64) int64 {
	if v, err := strconv.ParseInt(env[key], 10, 64); err == nil && v >= 0 {
		return v
	}
	return fallback
}

func (s *server) Run(_ context.Context, req *pb.RunRequest) (*pb.RunResponse, error) {
	chunk := int(envInt(req.Env, "LOG_CHUNK", 1024))
	if chunk < 1 || chunk > len(s.logData) {
		return nil, status.Errorf(codes.InvalidArgument, "LOG_CHUNK must be 1..%d", len(s.logData))
	}
	j := &job{
		scenario: req.Env["SCENARIO"],
		logBytes: envInt(req.Env, "LOG_BYTES", 4096),
		logChunk: chunk,
		started:  time.Now(),
	}
	s.mu.Lock()
	s.jobs[req.Id] = j
	s.mu.Unlock()
	return &pb.RunResponse{}, nil
}

func (s *server) FollowLogs(req *pb.FollowLogsRequest, stream pb.StepRunner_FollowLogsServer) error {
	j, err := s.lookup(req.Id)
	if err != nil {
		return err
	}
	// grpc-go marshals in Send, so one response value can be reused for every message.
	msg := &pb.FollowLogsResponse{}
	for off := req.Offset; off < j.logBytes; off += int64(j.logChunk) {
		n := int64(j.logChunk)
		if rest := j.logBytes - off; rest < n {
			n = rest
		}
		msg.Data = s.logData[:n]
		if err := stream.Send(msg); err != nil {
			return err
		}
		if j.scenario == "client_cancel" {
			// The client gives up on the stream after its first message.
			<-stream.Context().Done()
			return stream.Context().Err()
		}
	}
	return nil
}

// undecodableMessage marks a Status whose response the codec replaces with bytes
// that do not decode as a StatusResponse.
const undecodableMessage = "\x00undecodable"

// statusOf answers Status per the job's scenario; the names match the rows of
// SPEC section 3 that a step-runner can produce on its own.
func statusOf(id string, j job) (*pb.Status, error) {
	st := &pb.Status{
		Id:        id,
		Status:    pb.StepResult_failure,
		StartTime: timestamppb.New(j.started),
		EndTime:   timestamppb.Now(),
	}
	kind := func(k pb.StatusError_ErrorKind) *pb.StatusError {
		return &pb.StatusError{Message: "step failed", Kind: k}
	}
	scenario := j.scenario
	if j.cancelled {
		scenario = "cancelled"
	}
	switch scenario {
	case "", "success":
		st.Status = pb.StepResult_success
	case "step_failure":
		st.Error = kind(pb.StatusError_step_failure)
	case "internal":
		st.Error = kind(pb.StatusError_internal)
	case "timeout":
		st.Error = kind(pb.StatusError_timeout)
	case "failure_noerror":
		st.Message = "exit status 1"
	case "unknown_kind":
		st.Error = kind(pb.StatusError_unknown)
	case "unrecognized_kind":
		// An ErrorKind number newer than this build's proto.
		st.Error = kind(pb.StatusError_ErrorKind(99))
	case "undecodable_status":
		st.Message = undecodableMessage
	case "cancelled":
		st.Status = pb.StepResult_cancelled
		st.Error = kind(pb.StatusError_cancelled)
	case "panic_status":
		// What step-runner's panic-recovery interceptor answers.
		return nil, status.Error(codes.Internal, "panic in /proto.StepRunner/Status")
	case "unavailable_status":
		return nil, status.Error(codes.Unavailable, "step-runner is shutting down")
	case "unknown_code":
		return nil, status.Error(codes.Unknown, "exec: not started")
	case "client_cancel", "deadline":
		// The client ended these jobs' calls itself (it cancels FollowLogs; it gives
		// Status a short deadline, which statusHandler waits out).
		st.Status = pb.StepResult_success
	default:
		return nil, status.Errorf(codes.InvalidArgument, "unknown SCENARIO %q", scenario)
	}
	return st, nil
}

func (s *server) Status(ctx context.Context, req *pb.StatusRequest) (*pb.StatusResponse, error) {
	if req.Id == "" {
		return s.listAll()
	}
	j, err := s.lookup(req.Id)
	if err != nil {
		return nil, err
	}
	if j.scenario == "deadline" {
		<-ctx.Done()
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	st, err := statusOf(req.Id, j)
	if err != nil {
		return nil, err
	}
	return &pb.StatusResponse{Jobs: []*pb.Status{st}}, nil
}

func (s *server) listAll() (*pb.StatusResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	resp := &pb.StatusResponse{}
	for id, j := range s.jobs {
		if st, err := statusOf(id, *j); err == nil {
			resp.Jobs = append(resp.Jobs, st)
		}
	}
	return resp, nil
}

func (s *server) Cancel(_ context.Context, req *pb.CancelRequest) (*pb.CancelResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	j, ok := s.jobs[req.Id]
	if !ok {
		return nil, status.Errorf(codes.NotFound, "job %q not found", req.Id)
	}
	j.cancelled = true
	return &pb.CancelResponse{}, nil
}

func (s *server) Close(_ context.Context, req *pb.CloseRequest) (*pb.CloseResponse, error) {
	s.mu.Lock()
	delete(s.jobs, req.Id)
	s.mu.Unlock()
	return &pb.CloseResponse{}, nil
}

// undecodableCodec is grpc-go's proto codec, except that a StatusResponse carrying
// undecodableMessage goes out as a truncated message: what a client sees when a
// server's schema disagrees with its own (SPEC section 3, "does not decode").
type undecodableCodec struct{ encoding.Codec }

func (c undecodableCodec) Marshal(v interface{}) ([]byte, error) {
	if r, ok := v.(*pb.StatusResponse); ok && len(r.Jobs) == 1 && r.Jobs[0].Message == undecodableMessage {
		// Field 1 (jobs), length 5, but only one byte follows.
		return []byte{0x0a, 0x05, 0x0a}, nil
	}
	return c.Codec.Marshal(v)
}

func newGRPCServer(maxChunk int) *grpc.Server {
	srv := grpc.NewServer()
	pb.RegisterStepRunnerServer(srv, newServer(maxChunk))
	return srv
}

func init() {
	encoding.RegisterCodec(undecodableCodec{encoding.GetCodec("proto")})
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "steps" {
		os.Exit(steps(os.Args[2:]))
	}
	socket := flag.String("socket", "", "unix socket path to listen on")
	maxChunk := flag.Int("max-chunk", 64<<10, "largest LOG_CHUNK a job may ask for")
	flag.Parse()
	if *socket == "" {
		log.Fatal("-socket is required")
	}
	_ = os.Remove(*socket)
	lis, err := net.Listen("unix", *socket)
	if err != nil {
		log.Fatal(err)
	}
	srv := newGRPCServer(*maxChunk)
	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		<-sig
		srv.Stop()
	}()
	if err := srv.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		log.Fatal(err)
	}
}
