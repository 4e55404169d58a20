package report

import (
	"fmt"
	"time"
)

// Dur formats a duration for a status line or summary with three significant
// digits in the unit that suits it: 812ns, 81.2µs, 1.32ms, 2.50s, 1234s.
func Dur(d time.Duration) string {
	x := float64(d)
	unit := "ns"
	for _, u := range []string{"µs", "ms", "s"} {
		if x < 999.5 {
			break
		}
		x, unit = x/1000, u
	}
	switch {
	case unit == "ns" || x >= 99.95:
		return fmt.Sprintf("%.0f%s", x, unit)
	case x < 9.995:
		return fmt.Sprintf("%.2f%s", x, unit)
	}
	return fmt.Sprintf("%.1f%s", x, unit)
}

// BytesSI formats a byte count with a decimal prefix: 812B, 4.10MB, 1.07GB.
func BytesSI(x float64) string { return SI(x) + "B" }

// SI formats x with three significant digits and a decimal prefix: 999, 1.00k,
// 23.1M.
func SI(x float64) string {
	const prefixes = "kMGTPE"
	if x < 999.5 {
		return fmt.Sprintf("%.0f", x)
	}
	i := -1
	for x >= 999.5 && i < len(prefixes)-1 {
		x /= 1000
		i++
	}
	switch {
	case x < 9.995:
		return fmt.Sprintf("%.2f%c", x, prefixes[i])
	case x < 99.95:
		return fmt.Sprintf("%.1f%c", x, prefixes[i])
	}
	return fmt.Sprintf("%.0f%c", x, prefixes[i])
}
