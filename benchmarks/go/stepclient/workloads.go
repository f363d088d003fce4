package main

// The client shapes of issue 11 beyond Runner's own: one long-lived connection that
// every worker shares (a client that keeps its connection, so the sidecar's HPACK
// state never repeats) and unary calls without a deadline (no grpc-timeout header).

import (
	"context"
	"flag"
	"sync"

	pb "gitlab.com/gitlab-org/step-runner/proto"
	"google.golang.org/grpc"
)

var (
	sharedConn = flag.Bool("shared", false,
		"every worker uses one long-lived connection (jobs, status) instead of one per job")
	deadlines = flag.Bool("deadlines", true,
		"unary calls carry a deadline (grpc-timeout); false sends them without one")
)

var (
	sharedOnce sync.Once
	shared     *grpc.ClientConn
	sharedErr  error
)

// jobClient is the StepRunner client a job (or a status worker) uses and what to do
// when it is done with it: its own connection, closed after the job, or the one
// shared connection, kept for the whole run.
func jobClient(o *options) (pb.StepRunnerClient, func(), error) {
	if *sharedConn {
		sharedOnce.Do(func() { shared, sharedErr = dial(o) })
		if sharedErr != nil {
			return nil, nil, sharedErr
		}
		return pb.NewStepRunnerClient(shared), func() {}, nil
	}
	conn, err := dial(o)
	if err != nil {
		return nil, nil, err
	}
	return pb.NewStepRunnerClient(conn), func() { conn.Close() }, nil
}

// deadlineCtx is the context of one unary call: under callTimeout, or without any
// deadline with -deadlines=false.
func deadlineCtx() (context.Context, context.CancelFunc) {
	if !*deadlines {
		return context.WithCancel(context.Background())
	}
	return context.WithTimeout(context.Background(), callTimeout)
}
