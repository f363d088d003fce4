package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// dockerDialer reaches step-runner the way GitLab Runner's Docker executor does
// (executors/docker/steps.go): per gRPC connection one exec in the build container
// running `<helper> steps proxy --socket <path>`, started hijacked, gRPC on its
// stdin and on the stdout frames of the multiplexed stream (stderr discarded).
type dockerDialer struct {
	api       string // the Docker Engine API socket: the daemon's, or a tap's
	container string
	cmd       []string
	version   string
	// Exec creates go through a keep-alive pool as the Docker client's do; each
	// start gets a connection of its own, which the upgrade then takes over.
	http    *http.Client
	execs   int64 // exec sessions started (101 received)
	refused int64 // exec creates or starts the daemon did not accept
}

// closeWait bounds how long closing a connection waits for the daemon to end the
// exec after stdin's half-close (the proxy exits when the server closes its side).
const closeWait = 10 * time.Second

func newDockerDialer(api, container, helper, stepsSocket, version string, pool int) *dockerDialer {
	dialUnix := func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", api)
	}
	return &dockerDialer{
		api:       api,
		container: container,
		cmd:       []string{helper, "steps", "proxy", "--socket", stepsSocket},
		version:   version,
		http: &http.Client{Transport: &http.Transport{
			DialContext:         dialUnix,
			MaxIdleConnsPerHost: pool,
			IdleConnTimeout:     30 * time.Second,
		}},
	}
}

func (d *dockerDialer) url(path string) string {
	return "http://docker/v" + d.version + path
}

// execConfig is the exec create body as the Docker client encodes it.
type execConfig struct {
	User         string
	Privileged   bool
	Tty          bool
	AttachStdin  bool
	AttachStderr bool
	AttachStdout bool
	Detach       bool
	DetachKeys   string
	Env          []string
	WorkingDir   string
	Cmd          []string
}

func apiError(what string, resp *http.Response) error {
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	return fmt.Errorf("%s: %s: %s", what, resp.Status, strings.TrimSpace(string(msg)))
}

func (d *dockerDialer) create(ctx context.Context) (string, error) {
	body, err := json.Marshal(execConfig{AttachStdin: true, AttachStderr: true, AttachStdout: true, Cmd: d.cmd})
	if err != nil {
		return "", err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, d.url("/containers/"+d.container+"/exec"), bytes.NewReader(body))
	if err != nil {
		return "", err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := d.http.Do(req)
	if err != nil {
		return "", fmt.Errorf("exec create: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		return "", apiError("exec create", resp)
	}
	var created struct {
		ID string `json:"Id"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&created); err != nil || created.ID == "" {
		return "", fmt.Errorf("exec create: no id in the answer (%v)", err)
	}
	return created.ID, nil
}

// start sends `POST /exec/{id}/start` on a fresh connection with the upgrade headers
// and returns that connection after the daemon's 101, with what it read past the
// response headers.
func (d *dockerDialer) start(ctx context.Context, id string) (*net.UnixConn, *bufio.Reader, error) {
	var nd net.Dialer
	c, err := nd.DialContext(ctx, "unix", d.api)
	if err != nil {
		return nil, nil, fmt.Errorf("exec start: %w", err)
	}
	raw := c.(*net.UnixConn)
	if deadline, ok := ctx.Deadline(); ok {
		_ = raw.SetDeadline(deadline)
	}
	req, err := http.NewRequest(http.MethodPost, d.url("/exec/"+id+"/start"), strings.NewReader(`{"Detach":false,"Tty":false}`))
	if err != nil {
		raw.Close()
		return nil, nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "tcp")
	if err := req.Write(raw); err != nil {
		raw.Close()
		return nil, nil, fmt.Errorf("exec start: %w", err)
	}
	br := bufio.NewReaderSize(raw, 32<<10)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		raw.Close()
		return nil, nil, fmt.Errorf("exec start: %w", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		err := apiError("exec start", resp)
		raw.Close()
		return nil, nil, err
	}
	_ = raw.SetDeadline(time.Time{})
	return raw, br, nil
}

// DialContext is the gRPC connection's dialer: one exec session per call.
func (d *dockerDialer) DialContext(ctx context.Context, _ string) (net.Conn, error) {
	id, err := d.create(ctx)
	if err != nil {
		atomic.AddInt64(&d.refused, 1)
		return nil, err
	}
	raw, br, err := d.start(ctx, id)
	if err != nil {
		atomic.AddInt64(&d.refused, 1)
		return nil, err
	}
	atomic.AddInt64(&d.execs, 1)
	pr, pw := io.Pipe()
	c := &execConn{UnixConn: raw, stdout: pr, done: make(chan struct{})}
	go func() {
		defer close(c.done)
		pw.CloseWithError(demux(pw, br))
	}()
	return c, nil
}

// execConn is a hijacked exec session as a net.Conn: writes go to the exec's stdin
// raw, reads come from its stdout frames.
type execConn struct {
	*net.UnixConn
	stdout *io.PipeReader
	done   chan struct{}
	once   sync.Once
}

func (c *execConn) Read(p []byte) (int, error) { return c.stdout.Read(p) }

// Close ends stdin with a half-close, as the Docker CLI does, and waits for the
// daemon to end the session: the proxy sees EOF, the server closes its side, the
// proxy exits, and only then does the daemon close the stream.
func (c *execConn) Close() error {
	c.once.Do(func() {
		_ = c.UnixConn.CloseWrite()
		// From here on nobody reads stdout; demux drains what is left.
		_ = c.stdout.CloseWithError(net.ErrClosed)
		select {
		case <-c.done:
		case <-time.After(closeWait):
		}
		_ = c.UnixConn.Close()
	})
	return nil
}

// demux is Docker's stdcopy: 8-byte headers (stream, 3 zero bytes, big-endian
// uint32 length) before each frame; stdout frames go to w, stderr frames are
// dropped. Once w fails (the connection was closed) the rest is drained so the
// daemon can finish the session. Returns nil at a clean end of stream.
func demux(w io.Writer, r io.Reader) error {
	var hdr [8]byte
	buf := make([]byte, 32<<10)
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("exec stream: %w", err)
		}
		n := int(binary.BigEndian.Uint32(hdr[4:]))
		switch hdr[0] {
		case 0, 1, 2:
		case 3:
			msg, _ := io.ReadAll(io.LimitReader(r, int64(n)))
			return fmt.Errorf("exec stream: daemon error: %s", msg)
		default:
			return fmt.Errorf("exec stream: unknown stream %d", hdr[0])
		}
		for n > 0 {
			chunk := buf
			if n < len(chunk) {
				chunk = chunk[:n]
			}
			if _, err := io.ReadFull(r, chunk); err != nil {
				return fmt.Errorf("exec stream: %w", err)
			}
			n -= len(chunk)
			if hdr[0] != 2 && w != nil {
				if _, err := w.Write(chunk); err != nil {
					w = nil
				}
			}
		}
	}
}
