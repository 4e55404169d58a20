package main

import (
	"io"
)

// runJob is the main job, `repagent [flags]`: a test VM replicated to a
// backup in the same process over loopback TCP.
func runJob(args []string, stdout, stderr io.Writer) int {
	o, err := parseJobArgs(args)
	return execute("repagent", o, err, usage, nil, stdout, stderr)
}
