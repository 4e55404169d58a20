package report

import (
	"testing"
	"time"
)

func TestDur(t *testing.T) {
	for _, tc := range []struct {
		d    time.Duration
		want string
	}{
		{0, "0ns"}, {812, "812ns"}, {999, "999ns"}, {1000, "1.00µs"}, {81200, "81.2µs"}, {999400, "999µs"},
		{999600, "1.00ms"}, {1320 * time.Microsecond, "1.32ms"}, {115 * time.Millisecond, "115ms"},
		{2500 * time.Millisecond, "2.50s"}, {1234 * time.Second, "1234s"},
	} {
		if got := Dur(tc.d); got != tc.want {
			t.Errorf("dur(%d) = %q, want %q", tc.d, got, tc.want)
		}
	}
}

func TestSI(t *testing.T) {
	for _, tc := range []struct {
		x    float64
		want string
	}{
		{0, "0"}, {999.4, "999"}, {999.6, "1.00k"}, {1000, "1.00k"}, {9994, "9.99k"}, {9996, "10.0k"},
		{23_100_000, "23.1M"}, {999_400_000, "999M"}, {999_600_000, "1.00G"}, {4.2e18, "4.20E"}, {4.2e21, "4200E"},
	} {
		if got := SI(tc.x); got != tc.want {
			t.Errorf("si(%g) = %q, want %q", tc.x, got, tc.want)
		}
	}
}
