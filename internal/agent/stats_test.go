package agent

import (
	"testing"
	"time"
)

func TestStatusLineString(t *testing.T) {
	for _, tc := range []struct {
		s    statusLine
		want string
	}{
		{statusLine{elapsed: 3 * time.Second, epochs: 10, n: 10, p50: 1230 * time.Microsecond, p99: 2340 * time.Microsecond,
			dirty: 5120, wireRate: 23.4e6, ratio: 0.4123, lag: 1, ack: 1200 * time.Microsecond, guest: 2.31e6, op: "writes",
			xfer: 3400 * time.Microsecond, period: 100 * time.Millisecond, cpu: 2100 * time.Nanosecond, backupCPU: 1050 * time.Nanosecond},
			"   3.0s  10.0 epochs/s  pause p50 1.23ms p99 2.34ms  dirty 5.12k/epoch  wire 23.4MB/s  ratio 0.412  lag 1 ack 1.20ms  xfer 3.40ms  period 100ms  cpu/page 2.10µs+1.05µs  guest 2.31M writes/s"},
		{statusLine{elapsed: 12 * time.Second, ack: 3 * time.Millisecond, guest: 580, op: "ticks", unprotected: true},
			"  12.0s  0.0 epochs/s  pause p50 - p99 -  dirty -/epoch  wire 0B/s  ratio -  lag 0 ack 3.00ms  xfer -  period -  cpu/page -  guest 580 ticks/s  UNPROTECTED"},
		{statusLine{elapsed: 2 * time.Second, epochs: 20, n: 20, p50: time.Millisecond, p99: time.Millisecond, dirty: 120, wireRate: 51e6,
			ratio: 0.1, ack: 2 * time.Millisecond, guest: 12300, op: "block writes", disk: &diskLine{writes: 12300, bytes: 50.4e6},
			net: &netLine{held: 10, released: 10, holdP50: time.Millisecond, holdP99: 2 * time.Millisecond}, unprotected: true},
			"   2.0s  20.0 epochs/s  pause p50 1.00ms p99 1.00ms  dirty 120/epoch  wire 51.0MB/s  ratio 0.100  lag 0 ack 2.00ms  xfer 0ns  period -  cpu/page 0ns+0ns  guest 12.3k block writes/s" +
				"  disk 12.3k writes/s 50.4MB/s  net held 10/s rel 10/s hold p50 1.00ms p99 2.00ms  UNPROTECTED"},
	} {
		if got := tc.s.String(); got != tc.want {
			t.Errorf("got  %q\nwant %q", got, tc.want)
		}
	}
}
