// Command citool is the handful of static tools the Docker tests run in containers
// of an image that has no shell or libc (tests/integration/docker_images.py). It is
// multi-call: the tool is the name it was run as (/bin/echo, /bin/sleep, ...), or
// the first argument when run as citool.
//
//	echo ARGS...        ARGS joined by spaces and a newline, on stdout
//	echoerr ARGS...     the same on stderr
//	cat                 stdin to stdout until EOF
//	sleep SECONDS       sleep (fractions allowed); exits 0 at SIGTERM
//	emit BYTES [CHUNK]  BYTES deterministic bytes on stdout, CHUNK bytes per write
//	lines N INTERVAL    N numbered lines on stdout, INTERVAL (e.g. 50ms) apart
//	exit CODE           exit with CODE
//	true                exit 0
package main

import (
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	args := os.Args
	name := filepath.Base(args[0])
	if name == "citool" {
		if len(args) < 2 {
			fail(2, "usage: citool TOOL ARGS...")
		}
		args = args[1:]
		name = args[0]
	}
	if err := run(name, args[1:]); err != nil {
		fail(1, name+": "+err.Error())
	}
}

func fail(code int, msg string) {
	fmt.Fprintln(os.Stderr, msg)
	os.Exit(code)
}

func run(name string, args []string) error {
	switch name {
	case "echo":
		_, err := fmt.Fprintln(os.Stdout, strings.Join(args, " "))
		return err
	case "echoerr":
		_, err := fmt.Fprintln(os.Stderr, strings.Join(args, " "))
		return err
	case "cat":
		_, err := io.Copy(os.Stdout, os.Stdin)
		return err
	case "sleep":
		return sleep(args)
	case "emit":
		return emit(args)
	case "lines":
		return lines(args)
	case "exit":
		code, err := strconv.Atoi(arg(args, 0))
		if err != nil {
			return err
		}
		os.Exit(code)
	case "true":
		return nil
	}
	return fmt.Errorf("unknown tool")
}

func arg(args []string, i int) string {
	if i < len(args) {
		return args[i]
	}
	return ""
}

func sleep(args []string) error {
	secs, err := strconv.ParseFloat(arg(args, 0), 64)
	if err != nil {
		return err
	}
	// As a container's PID 1 an unhandled SIGTERM is ignored; `docker stop` should
	// not have to wait for its kill timeout.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-time.After(time.Duration(secs * float64(time.Second))):
	case <-sig:
	}
	return nil
}

func emit(args []string) error {
	total, err := strconv.ParseInt(arg(args, 0), 10, 64)
	if err != nil {
		return err
	}
	chunk := 32 << 10
	if len(args) > 1 {
		if chunk, err = strconv.Atoi(args[1]); err != nil || chunk < 1 {
			return fmt.Errorf("bad CHUNK %q", args[1])
		}
	}
	buf := make([]byte, chunk)
	for i := range buf {
		buf[i] = "0123456789abcdef\n"[i%17]
	}
	for total > 0 {
		n := int64(chunk)
		if total < n {
			n = total
		}
		if _, err := os.Stdout.Write(buf[:n]); err != nil {
			return err
		}
		total -= n
	}
	return nil
}

func lines(args []string) error {
	n, err := strconv.Atoi(arg(args, 0))
	if err != nil {
		return err
	}
	interval, err := time.ParseDuration(arg(args, 1))
	if err != nil {
		return err
	}
	for i := 1; i <= n; i++ {
		if _, err := fmt.Fprintf(os.Stdout, "line %d\n", i); err != nil {
			return err
		}
		if i < n {
			time.Sleep(interval)
		}
	}
	return nil
}
