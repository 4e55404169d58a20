package main

import "github.com/repagent/repagent/internal/agent"

// The command's usage errors are the agent's: both reject what the user asked
// for with exit code 2.
type usageError = agent.UsageError

func usagef(format string, args ...any) error { return agent.Usagef(format, args...) }
