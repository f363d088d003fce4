package main

import (
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"
)

// defaultStepsSocket is where `steps serve` listens unless told otherwise; Runner
// never relies on it, it passes `--socket` with the path serve reported.
const defaultStepsSocket = "/tmp/step-runner.sock"

// steps runs `steps serve` or `steps proxy` and returns the exit status.
func steps(args []string) int {
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, "usage: steps serve|proxy [--socket PATH]")
		return 2
	}
	fs := flag.NewFlagSet("steps "+args[0], flag.ContinueOnError)
	socket := fs.String("socket", defaultStepsSocket, "unix socket of the step-runner server")
	maxChunk := fs.Int("max-chunk", 64<<10, "largest LOG_CHUNK a job may ask for (serve)")
	if err := fs.Parse(args[1:]); err != nil {
		return 2
	}
	var err error
	switch args[0] {
	case "serve":
		err = serve(*socket, *maxChunk)
	case "proxy":
		err = proxy(*socket)
	default:
		err = fmt.Errorf("unknown subcommand %q", args[0])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "steps "+args[0]+":", err)
		return 1
	}
	return 0
}

// serve listens, then prints the ready line Runner's Docker executor waits for on the
// container's stderr (the format of gitlab-runner's commands/steps readyMessage).
func serve(socket string, maxChunk int) error {
	_ = os.Remove(socket)
	lis, err := net.Listen("unix", socket)
	if err != nil {
		return fmt.Errorf("opening socket: %w", err)
	}
	srv := newGRPCServer(maxChunk)
	go func() {
		// As PID 1 of a container the process ignores signals it does not handle;
		// `docker stop` sends SIGTERM.
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		<-sig
		srv.Stop()
	}()
	fmt.Fprintf(os.Stderr, "step-runner is listening on socket %s\n", socket)
	return srv.Serve(lis)
}

// proxy splices stdio to the server socket: stdin to the socket, then a half-close
// so the server sees the client's end of stream; the socket to stdout until the
// server closes its side, which ends the exec session.
func proxy(socket string) error {
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		return fmt.Errorf("dialing: %w", err)
	}
	defer conn.Close()
	go func() {
		_, _ = io.Copy(conn, os.Stdin)
		_ = conn.CloseWrite()
	}()
	_, err = io.Copy(os.Stdout, conn)
	return err
}
