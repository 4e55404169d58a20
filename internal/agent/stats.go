package agent

import (
	"github.com/repagent/repagent/internal/epochstat"
	"github.com/repagent/repagent/internal/report"
)

// The epochs' aggregation and the figures' formatting are shared with the
// bench (internal/epochstat, internal/report); these are the command's short
// names for them.
type (
	hist     = epochstat.Hist
	epochAgg = epochstat.Agg
)

var (
	dur     = report.Dur
	si      = report.SI
	bytesSI = report.BytesSI
)
