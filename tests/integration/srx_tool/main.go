// Command srx-tool: the few small programs the docker tap's parity tests run inside
// containers of an image that holds nothing else (no shell, no coreutils). Static,
// standard library only, so `CGO_ENABLED=0 GO111MODULE=off go build` makes it anywhere.
//
//	srx-tool print LINES INTERVAL_MS CODE  LINES lines to stdout and to stderr, then exit CODE
//	srx-tool echo                          each stdin line back on stdout ("err: " + line on
//	                                       stderr); a line "exit N" exits N, EOF exits 0
//	srx-tool cat                           stdin to stdout, then its byte count on stderr
//	srx-tool sleep                         block until SIGTERM or SIGINT, then exit 0
//	srx-tool exit CODE                     exit CODE at once
package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func number(s string) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		fmt.Fprintf(os.Stderr, "srx-tool: not a number: %q\n", s)
		os.Exit(125)
	}
	return n
}

func printLines(lines, intervalMS, code int) {
	for i := 0; i < lines; i++ {
		fmt.Fprintf(os.Stdout, "out %d of %d\n", i+1, lines)
		fmt.Fprintf(os.Stderr, "err %d of %d\n", i+1, lines)
		if intervalMS > 0 {
			time.Sleep(time.Duration(intervalMS) * time.Millisecond)
		}
	}
	os.Exit(code)
}

func echo() {
	reader := bufio.NewReader(os.Stdin)
	for {
		line, err := reader.ReadString('\n')
		if line != "" {
			text := strings.TrimRight(line, "\n")
			if strings.HasPrefix(text, "exit ") {
				os.Exit(number(strings.TrimPrefix(text, "exit ")))
			}
			fmt.Fprintf(os.Stdout, "%s\n", text)
			fmt.Fprintf(os.Stderr, "err: %s\n", text)
		}
		if err != nil {
			os.Exit(0)
		}
	}
}

func cat() {
	n, err := io.Copy(os.Stdout, os.Stdin)
	if err != nil {
		fmt.Fprintf(os.Stderr, "srx-tool cat: %v\n", err)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "%d bytes\n", n)
}

func sleep() {
	// As PID 1 in a container a process gets no default signal handling, so `docker
	// stop` would wait out its timeout without this.
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	<-signals
}

func main() {
	args := os.Args[1:]
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, "usage: srx-tool print|echo|cat|sleep|exit ...")
		os.Exit(125)
	}
	switch {
	case args[0] == "print" && len(args) == 4:
		printLines(number(args[1]), number(args[2]), number(args[3]))
	case args[0] == "echo":
		echo()
	case args[0] == "cat":
		cat()
	case args[0] == "sleep":
		sleep()
	case args[0] == "exit" && len(args) == 2:
		os.Exit(number(args[1]))
	default:
		fmt.Fprintf(os.Stderr, "srx-tool: unknown command %q\n", args)
		os.Exit(125)
	}
}
