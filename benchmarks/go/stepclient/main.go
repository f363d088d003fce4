// Command stepclient is the benchmark's GitLab Runner stand-in: it drives a StepRunner
// socket the way Runner does (one connection per job; Run, FollowLogs until EOF,
// Status, Close; unary calls under a 60 s deadline) and prints one JSON object with
// what it measured.
//
// Modes:
//
//	status: each of -concurrency workers runs one job and then calls Status on it
//	        for -duration; reports calls/s and latency percentiles.
//	logs:   one job whose log is -log-bytes in -chunk byte messages; reports the
//	        FollowLogs throughput.
//	jobs:   -concurrency workers run whole job lifecycles (a -log-bytes log in
//	        -chunk byte messages, outcomes from a fixed mix) for -duration or until
//	        -jobs jobs ran; reports jobs/s and the client's own tally: outcomes,
//	        jobs per scenario and calls per method and gRPC code.
//
// Routes: -socket dials the StepRunner socket itself. With -docker the client dials
// as GitLab Runner's Docker executor does (docker.go): one exec of
// `-helper steps proxy --socket -steps-socket` in -container per connection, through
// the Docker Engine API socket -docker (the daemon's, or a tap's).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	pb "gitlab.com/gitlab-org/step-runner/proto"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// callTimeout is the per-call deadline Runner puts on unary calls, so every unary
// request carries a grpc-timeout header as it does in production.
const callTimeout = 60 * time.Second

type options struct {
	socket      string
	docker      *dockerDialer
	mode        string
	concurrency int
	duration    time.Duration
	warmup      time.Duration
	jobs        int64
	logBytes    int64
	chunk       int
	idBase      uint64
	scenario    string // every job's scenario instead of the mix (jobs)
}

// outcomeMix is the realistic spread of job outcomes, in jobs per 100, and what
// Runner makes of each; together the scenarios cover every row of SPEC section 3
// that a job's own calls can produce (the stand-in server scripts each one).
var outcomeMix = []struct {
	scenario string
	per100   int
	result   string
}{
	{"success", 74, "success"},
	{"step_failure", 10, "failed"},
	{"internal", 3, "failed"},
	{"timeout", 2, "failed"},
	{"failure_noerror", 1, "failed"},
	{"unknown_kind", 1, "failed"},
	{"unrecognized_kind", 1, "failed"},
	{"cancelled", 2, "cancelled"},
	{"client_cancel", 1, "cancelled"},
	{"panic_status", 1, "failed"},
	{"undecodable_status", 1, "failed"},
	{"unavailable_status", 1, "failed"},
	{"unknown_code", 1, "failed"},
	{"deadline", 1, "failed"},
}

// deadlineTimeout is the deadline of the deadline scenario's Status call, which the
// server waits out.
const deadlineTimeout = 50 * time.Millisecond

var scenarioTable, resultTable = buildMix()

// scenarioResult is Runner's verdict per scenario.
var scenarioResult = func() map[string]string {
	m := map[string]string{}
	for _, s := range outcomeMix {
		m[s.scenario] = s.result
	}
	return m
}()

func buildMix() (scenarios, results [100]string) {
	i := 0
	for _, m := range outcomeMix {
		for k := 0; k < m.per100; k++ {
			// Stepping by 37 (coprime with 100) spreads each scenario over the
			// sequence, so even a short run sees the mix.
			slot := (i * 37) % 100
			scenarios[slot], results[slot] = m.scenario, m.result
			i++
		}
	}
	if i != 100 {
		panic("outcomeMix must add up to 100")
	}
	return scenarios, results
}

func dial(o *options) (*grpc.ClientConn, error) {
	if o.docker != nil {
		return grpc.Dial("localhost", grpc.WithInsecure(), grpc.WithContextDialer(o.docker.DialContext))
	}
	return grpc.Dial("localhost",
		grpc.WithInsecure(),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", o.socket)
		}))
}

func unaryCtx() (context.Context, context.CancelFunc) {
	return deadlineCtx()
}

func runRequest(id string, scenario string, logBytes int64, chunk int) *pb.RunRequest {
	vars := []*pb.Variable{
		{Key: "CI_JOB_ID", Value: id},
		{Key: "CI_PROJECT_PATH", Value: "group/project"},
		{Key: "CI_COMMIT_SHA", Value: "0123456789abcdef0123456789abcdef01234567"},
		{Key: "CI_PIPELINE_SOURCE", Value: "push"},
		{Key: "SECRET_TOKEN", Value: "not-a-real-secret", Masked: true},
		{Key: "KUBECONFIG", Value: "apiVersion: v1\nkind: Config\n", File: true},
	}
	return &pb.RunRequest{
		Id:      id,
		WorkDir: "/builds/group/project/" + id,
		Env: map[string]string{
			"SCENARIO":  scenario,
			"LOG_BYTES": strconv.FormatInt(logBytes, 10),
			"LOG_CHUNK": strconv.Itoa(chunk),
			"CI_JOB_ID": id,
		},
		Job:   &pb.Job{Variables: vars, BuildDir: "/builds/group/project"},
		Steps: "- name: script\n  script: make test\n",
	}
}

func call(f func(ctx context.Context) error) error {
	ctx, cancel := unaryCtx()
	defer cancel()
	return f(ctx)
}

// calls tallies a job's calls as "Method:Code", in grpc-go's code spellings.
type calls map[string]int64

func (t calls) add(method string, err error) error {
	t[method+":"+status.Code(err).String()]++
	return err
}

// followLogs reads the job's log to EOF and returns bytes and messages received.
func followLogs(c pb.StepRunnerClient, id string) (int64, int64, error) {
	return followLogsCtx(context.Background(), c, id, nil)
}

// followLogsCtx is followLogs, calling first (if not nil) after the first message.
func followLogsCtx(ctx context.Context, c pb.StepRunnerClient, id string, first func()) (int64, int64, error) {
	stream, err := c.FollowLogs(ctx, &pb.FollowLogsRequest{Id: id})
	if err != nil {
		return 0, 0, err
	}
	var n, msgs int64
	for {
		m, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return n, msgs, nil
		}
		if err != nil {
			return n, msgs, err
		}
		n += int64(len(m.Data))
		msgs++
		if msgs == 1 && first != nil {
			first()
		}
	}
}

// resultOf classifies the job's Status answer as Runner does.
func resultOf(resp *pb.StatusResponse, err error) string {
	if err != nil {
		if status.Code(err) == codes.Canceled {
			return "cancelled"
		}
		return "failed"
	}
	if len(resp.Jobs) != 1 {
		return "failed"
	}
	st := resp.Jobs[0]
	switch {
	case st.Status == pb.StepResult_success:
		return "success"
	case st.Status == pb.StepResult_cancelled, st.Error != nil && st.Error.Kind == pb.StatusError_cancelled:
		return "cancelled"
	default:
		return "failed"
	}
}

// runJob runs one whole job lifecycle on its own connection and returns Runner's
// verdict on it, tallying its calls in t.
func runJob(o *options, id string, scenario string, t calls) (string, error) {
	c, release, err := jobClient(o)
	if err != nil {
		return "", err
	}
	defer release()
	if err := t.add("Run", call(func(ctx context.Context) error {
		_, err := c.Run(ctx, runRequest(id, scenario, o.logBytes, o.chunk))
		return err
	})); err != nil {
		return "", fmt.Errorf("Run: %w", err)
	}
	if scenario == "cancelled" {
		if err := t.add("Cancel", call(func(ctx context.Context) error {
			_, err := c.Cancel(ctx, &pb.CancelRequest{Id: id})
			return err
		})); err != nil {
			return "", fmt.Errorf("Cancel: %w", err)
		}
	}
	if scenario == "client_cancel" {
		// The user cancels while the log streams: Runner gives up on FollowLogs,
		// which decides the job, and closes it.
		ctx, cancel := context.WithCancel(context.Background())
		_, msgs, err := followLogsCtx(ctx, c, id, cancel)
		cancel()
		if t.add("FollowLogs", err); status.Code(err) != codes.Canceled || msgs == 0 {
			return "", fmt.Errorf("FollowLogs: want Canceled after a message, got %d messages, %v", msgs, err)
		}
		return "cancelled", closeJob(c, id, t)
	}
	n, _, err := followLogs(c, id)
	if t.add("FollowLogs", err) != nil {
		return "", fmt.Errorf("FollowLogs: %w", err)
	}
	if n != o.logBytes {
		return "", fmt.Errorf("FollowLogs: got %d bytes, want %d", n, o.logBytes)
	}
	// The deadline scenario's Status has its own short deadline, with or without
	// -deadlines.
	ctx, cancel := unaryCtx()
	if scenario == "deadline" {
		ctx, cancel = context.WithTimeout(context.Background(), deadlineTimeout)
	}
	var resp *pb.StatusResponse
	resp, statusErr := c.Status(ctx, &pb.StatusRequest{Id: id})
	cancel()
	result := resultOf(resp, t.add("Status", statusErr))
	return result, closeJob(c, id, t)
}

func closeJob(c pb.StepRunnerClient, id string, t calls) error {
	if err := t.add("Close", call(func(ctx context.Context) error {
		_, err := c.Close(ctx, &pb.CloseRequest{Id: id})
		return err
	})); err != nil {
		return fmt.Errorf("Close: %w", err)
	}
	return nil
}

type jobsResult struct {
	Mode        string           `json:"mode"`
	Concurrency int              `json:"concurrency"`
	Jobs        int64            `json:"jobs"`
	Seconds     float64          `json:"seconds"`
	JobsPerS    float64          `json:"jobs_per_s"`
	P50Ms       float64          `json:"p50_ms"`
	P99Ms       float64          `json:"p99_ms"`
	Outcomes    map[string]int64 `json:"outcomes"`
	Scenarios   map[string]int64 `json:"scenarios"`
	Calls       map[string]int64 `json:"calls"`
	Execs       int64            `json:"execs"`
	Refused     int64            `json:"refused_execs"`
	Errors      int64            `json:"errors"`
	FirstError  string           `json:"first_error,omitempty"`
	Failed      map[string]int64 `json:"failed_scenarios,omitempty"`
}

func runJobs(o *options) (any, error) {
	var next int64
	var mu sync.Mutex
	res := jobsResult{
		Mode: "jobs", Concurrency: o.concurrency, Outcomes: map[string]int64{},
		Scenarios: map[string]int64{}, Calls: map[string]int64{}, Failed: map[string]int64{},
	}
	var lat []time.Duration
	start := time.Now()
	deadline := start.Add(o.duration)
	var wg sync.WaitGroup
	for w := 0; w < o.concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := atomic.AddInt64(&next, 1) - 1
				if (o.jobs > 0 && i >= o.jobs) || (o.jobs == 0 && time.Now().After(deadline)) {
					return
				}
				t0 := time.Now()
				scenario, want := scenarioTable[i%100], resultTable[i%100]
				if o.scenario != "" {
					scenario, want = o.scenario, scenarioResult[o.scenario]
				}
				t := calls{}
				result, err := runJob(o, strconv.FormatUint(o.idBase+uint64(i), 10), scenario, t)
				d := time.Since(t0)
				mu.Lock()
				// Every call is tallied, also those of a job that went wrong: the
				// sidecar saw them too.
				for k, v := range t {
					res.Calls[k] += v
				}
				if err == nil && result != want {
					err = fmt.Errorf("job %d (%s): Runner would report %s", i, scenario, result)
				}
				if err != nil {
					res.Errors++
					res.Failed[scenario]++
					if res.FirstError == "" {
						res.FirstError = err.Error()
					}
				} else {
					res.Outcomes[result]++
					res.Scenarios[scenario]++
					lat = append(lat, d)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	res.Seconds = time.Since(start).Seconds()
	res.Jobs = int64(len(lat))
	if o.docker != nil {
		res.Execs, res.Refused = atomic.LoadInt64(&o.docker.execs), atomic.LoadInt64(&o.docker.refused)
	}
	res.JobsPerS = float64(res.Jobs) / res.Seconds
	ps := percentiles(lat, 0.5, 0.99)
	res.P50Ms, res.P99Ms = ps[0]/1000, ps[1]/1000
	return res, nil
}

type statusResult struct {
	Mode        string  `json:"mode"`
	Concurrency int     `json:"concurrency"`
	Calls       int     `json:"calls"`
	Seconds     float64 `json:"seconds"`
	CallsPerS   float64 `json:"calls_per_s"`
	P50Us       float64 `json:"p50_us"`
	P90Us       float64 `json:"p90_us"`
	P99Us       float64 `json:"p99_us"`
}

// statusWorker runs one job, then calls Status on it until stop, keeping the
// latencies of the calls that started at or after measureFrom.
func statusWorker(o *options, id string, measureFrom, stop time.Time) ([]time.Duration, error) {
	c, release, err := jobClient(o)
	if err != nil {
		return nil, err
	}
	defer release()
	if err := call(func(ctx context.Context) error {
		_, err := c.Run(ctx, runRequest(id, "success", 0, 1))
		return err
	}); err != nil {
		return nil, fmt.Errorf("Run: %w", err)
	}
	lat := make([]time.Duration, 0, 1<<16)
	req := &pb.StatusRequest{Id: id}
	for {
		t0 := time.Now()
		if !t0.Before(stop) {
			break
		}
		ctx, cancel := unaryCtx()
		_, err := c.Status(ctx, req)
		cancel()
		if err != nil {
			return nil, fmt.Errorf("Status: %w", err)
		}
		if !t0.Before(measureFrom) {
			lat = append(lat, time.Since(t0))
		}
	}
	return lat, call(func(ctx context.Context) error {
		_, err := c.Close(ctx, &pb.CloseRequest{Id: id})
		return err
	})
}

func runStatus(o *options) (any, error) {
	measureFrom := time.Now().Add(o.warmup)
	stop := measureFrom.Add(o.duration)
	lats := make([][]time.Duration, o.concurrency)
	errs := make([]error, o.concurrency)
	var wg sync.WaitGroup
	for w := 0; w < o.concurrency; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			id := strconv.FormatUint(o.idBase+uint64(w), 10)
			lats[w], errs[w] = statusWorker(o, id, measureFrom, stop)
		}(w)
	}
	wg.Wait()
	var all []time.Duration
	for w := range lats {
		if errs[w] != nil {
			return nil, errs[w]
		}
		all = append(all, lats[w]...)
	}
	ps := percentiles(all, 0.5, 0.9, 0.99)
	secs := o.duration.Seconds()
	return statusResult{
		Mode: "status", Concurrency: o.concurrency, Calls: len(all), Seconds: secs,
		CallsPerS: float64(len(all)) / secs, P50Us: ps[0], P90Us: ps[1], P99Us: ps[2],
	}, nil
}

type logsResult struct {
	Mode     string  `json:"mode"`
	Chunk    int     `json:"chunk"`
	Bytes    int64   `json:"bytes"`
	Messages int64   `json:"messages"`
	Seconds  float64 `json:"seconds"`
	MBPerS   float64 `json:"mb_per_s"`
	MsgsPerS float64 `json:"msgs_per_s"`
}

func runLogs(o *options) (any, error) {
	id := strconv.FormatUint(o.idBase, 10)
	conn, err := dial(o)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	c := pb.NewStepRunnerClient(conn)
	if err := call(func(ctx context.Context) error {
		_, err := c.Run(ctx, runRequest(id, "success", o.logBytes, o.chunk))
		return err
	}); err != nil {
		return nil, fmt.Errorf("Run: %w", err)
	}
	t0 := time.Now()
	n, msgs, err := followLogs(c, id)
	secs := time.Since(t0).Seconds()
	if err != nil {
		return nil, fmt.Errorf("FollowLogs: %w", err)
	}
	if n != o.logBytes {
		return nil, fmt.Errorf("FollowLogs: got %d bytes, want %d", n, o.logBytes)
	}
	for _, f := range []func(ctx context.Context) error{
		func(ctx context.Context) error { _, err := c.Status(ctx, &pb.StatusRequest{Id: id}); return err },
		func(ctx context.Context) error { _, err := c.Close(ctx, &pb.CloseRequest{Id: id}); return err },
	} {
		if err := call(f); err != nil {
			return nil, err
		}
	}
	return logsResult{
		Mode: "logs", Chunk: o.chunk, Bytes: n, Messages: msgs, Seconds: secs,
		MBPerS: float64(n) / 1e6 / secs, MsgsPerS: float64(msgs) / secs,
	}, nil
}

// percentiles returns the nearest-rank percentiles of ds in microseconds.
func percentiles(ds []time.Duration, qs ...float64) []float64 {
	out := make([]float64, len(qs))
	if len(ds) == 0 {
		return out
	}
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	for k, q := range qs {
		i := int(q*float64(len(ds)) + 0.5)
		if i >= len(ds) {
			i = len(ds) - 1
		}
		out[k] = float64(ds[i].Nanoseconds()) / 1000
	}
	return out
}

func main() {
	o := &options{}
	flag.StringVar(&o.socket, "socket", "", "unix socket path of the StepRunner server")
	flag.StringVar(&o.mode, "mode", "jobs", "status, logs or jobs")
	flag.IntVar(&o.concurrency, "concurrency", 1, "parallel workers (status, jobs)")
	flag.DurationVar(&o.duration, "duration", time.Second, "measured time (status; jobs when -jobs is 0)")
	flag.DurationVar(&o.warmup, "warmup", 200*time.Millisecond, "unmeasured time before -duration (status)")
	flag.Int64Var(&o.jobs, "jobs", 0, "run exactly this many jobs (jobs); 0 runs for -duration")
	flag.Int64Var(&o.logBytes, "log-bytes", 4096, "log size per job")
	flag.IntVar(&o.chunk, "chunk", 1024, "log bytes per FollowLogs message")
	flag.Uint64Var(&o.idBase, "id-base", 1, "first job id; ids are unique per run")
	flag.StringVar(&o.scenario, "scenario", "", "run every job as this scenario of the mix (jobs)")
	dockerAPI := flag.String("docker", "", "Docker Engine API unix socket: dial through exec sessions")
	container := flag.String("container", "", "build container whose main process is `steps serve` (-docker)")
	stepsSocket := flag.String("steps-socket", "", "the socket `steps serve` reported (-docker)")
	helper := flag.String("helper", "/usr/bin/gitlab-runner-helper", "helper binary in the container (-docker)")
	apiVersion := flag.String("api-version", "1.41", "Docker Engine API version of the request paths (-docker)")
	flag.Parse()
	modes := map[string]func(*options) (any, error){"status": runStatus, "logs": runLogs, "jobs": runJobs}
	run, ok := modes[o.mode]
	if _, known := scenarioResult[o.scenario]; o.scenario != "" && !known {
		ok = false
	}
	route := o.socket != ""
	if *dockerAPI != "" {
		route = !route && *container != "" && *stepsSocket != ""
		o.docker = newDockerDialer(*dockerAPI, *container, *helper, *stepsSocket, *apiVersion, o.concurrency)
	}
	if !route || !ok || o.concurrency < 1 || o.chunk < 1 {
		flag.Usage()
		os.Exit(2)
	}
	res, err := run(o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "stepclient:", err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		fmt.Fprintln(os.Stderr, "stepclient:", err)
		os.Exit(1)
	}
}
