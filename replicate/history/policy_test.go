package history

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestPresetsValidate(t *testing.T) {
	if got, want := PresetNames(), []string{"app-server", "database", "load-balancer"}; !slices.Equal(got, want) {
		t.Fatalf("PresetNames %v, want %v", got, want)
	}
	for _, n := range PresetNames() {
		p, ok := Preset(n)
		if !ok {
			t.Fatalf("Preset(%q) not found", n)
		}
		if err := p.Validate(); err != nil {
			t.Errorf("preset %s: %v", n, err)
		}
		if p.Name != n || p.Loss == "" || p.Cap != 0 {
			t.Errorf("preset %s: name %q, loss %q, cap %d", n, p.Name, p.Loss, p.Cap)
		}
		// Preset returns a copy: changing it leaves the preset alone.
		p.Tiers[0].Age = -1
		if q, _ := Preset(n); q.Tiers[0].Age <= 0 {
			t.Errorf("preset %s changed through a returned copy", n)
		}
	}
	if _, ok := Preset("mainframe"); ok {
		t.Error("Preset of an unknown name found")
	}
	db, _ := Preset("database")
	app, _ := Preset("app-server")
	lb, _ := Preset("load-balancer")
	for _, c := range []struct {
		p        Policy
		interval time.Duration
		tiers    []Tier
	}{
		{db, 0, []Tier{{10 * time.Second, 0}, {10 * time.Minute, time.Second}, {24 * time.Hour, time.Minute}}},
		{app, time.Second, []Tier{{10 * time.Minute, 0}, {24 * time.Hour, time.Minute}, {168 * time.Hour, time.Hour}}},
		{lb, 10 * time.Second, []Tier{{10 * time.Minute, 0}, {24 * time.Hour, 10 * time.Minute}}},
	} {
		if c.p.Interval != c.interval || !slices.Equal(c.p.Tiers, c.tiers) {
			t.Errorf("preset %s: interval %v tiers %v, want %v %v", c.p.Name, c.p.Interval, c.p.Tiers, c.interval, c.tiers)
		}
	}
}

func TestPolicyString(t *testing.T) {
	for _, c := range []struct {
		name, want string
	}{
		{"database", "database: a point every checkpoint; every point for 10s, 1/1s for 10m, 1/1m for 24h; no cap"},
		{"app-server", "app-server: a point at most every 1s; every point for 10m, 1/1m for 24h, 1/1h for 168h; no cap"},
		{"load-balancer", "load-balancer: a point at most every 10s; every point for 10m, 1/10m for 24h; no cap"},
	} {
		p, _ := Preset(c.name)
		if got := p.String(); got != c.want {
			t.Errorf("String:\n got %s\nwant %s", got, c.want)
		}
	}
	p := Policy{Name: "x", Interval: 1500 * time.Millisecond, Tiers: []Tier{{90 * time.Minute, 30 * time.Second}}, Cap: 1 << 30}
	if got, want := p.String(), "x: a point at most every 1.5s; 1/30s for 1h30m; cap 1073741824 bytes"; got != want {
		t.Errorf("String:\n got %s\nwant %s", got, want)
	}
}

func TestPolicyJSON(t *testing.T) {
	db, _ := Preset("database")
	b, err := json.Marshal(db)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), `"tiers":[{"age":"10s","every":"0s"},{"age":"10m","every":"1s"},{"age":"24h","every":"1m"}]`) ||
		!strings.Contains(string(b), `"interval":"0s"`) {
		t.Errorf("Marshal: %s", b)
	}
	var back Policy
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if back.Name != db.Name || back.Interval != db.Interval || back.Loss != db.Loss || !slices.Equal(back.Tiers, db.Tiers) {
		t.Errorf("round trip: %+v, want %+v", back, db)
	}
	var tier Tier
	if err := json.Unmarshal([]byte(`{"age":"1h","every":"90s"}`), &tier); err != nil || tier != (Tier{time.Hour, 90 * time.Second}) {
		t.Errorf("Tier: %+v %v", tier, err)
	}
	if err := json.Unmarshal([]byte(`{"age":"1h","evry":"90s"}`), &tier); err == nil || !strings.Contains(err.Error(), "unknown field") {
		t.Errorf("Tier with an unknown field: %v", err)
	}
}

func TestLoadPolicy(t *testing.T) {
	dir := t.TempDir()
	write := func(name, s string) string {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	if p, err := LoadPolicy("database"); err != nil || p.Name != "database" || len(p.Tiers) != 3 {
		t.Fatalf("preset: %+v %v", p, err)
	}

	good := write("good.json", `{"name":"batch","interval":"5s","loss":"5 s of work","cap":1000,
		"tiers":[{"age":"1h","every":"0s"},{"age":"24h","every":"10m"}]}`)
	p, err := LoadPolicy(good)
	if err != nil {
		t.Fatal(err)
	}
	want := Policy{Name: "batch", Interval: 5 * time.Second, Loss: "5 s of work", Cap: 1000,
		Tiers: []Tier{{time.Hour, 0}, {24 * time.Hour, 10 * time.Minute}}}
	if p.Name != want.Name || p.Interval != want.Interval || p.Loss != want.Loss || p.Cap != want.Cap || !slices.Equal(p.Tiers, want.Tiers) {
		t.Errorf("LoadPolicy: %+v, want %+v", p, want)
	}
	noName := write("noname.json", `{"tiers":[{"age":"1h"}]}`)
	if p, err := LoadPolicy(noName); err != nil || p.Name != noName || p.Tiers[0] != (Tier{time.Hour, 0}) {
		t.Errorf("unnamed: %+v %v", p, err)
	}

	for _, c := range []struct {
		name, body string
		want       []string // each in the error
	}{
		{"unknown", `{"tiers":[{"age":"1h"}],"color":"red"}`, []string{"unknown field", "color"}},
		{"unknown-tier-field", `{"tiers":[{"age":"1h","evry":"1s"}]}`, []string{"unknown field", "evry"}},
		{"bad-duration", `{"tiers":[{"age":"1 hour"}]}`, []string{"tier 0", "age", "1 hour", "no duration"}},
		{"bad-interval", `{"interval":"soon","tiers":[{"age":"1h"}]}`, []string{"interval", "soon"}},
		{"not-increasing", `{"tiers":[{"age":"1h"},{"age":"1h","every":"1m"}]}`, []string{"tier 1", "age", "strictly increase"}},
		{"decreasing", `{"tiers":[{"age":"1h"},{"age":"30m","every":"1m"}]}`, []string{"tier 1", "age", "not greater"}},
		{"no-tiers", `{"tiers":[]}`, []string{"tiers", "none"}},
		{"zero-age", `{"tiers":[{"age":"0s"}]}`, []string{"tier 0", "age", "not positive"}},
		{"every-too-long", `{"tiers":[{"age":"1h","every":"2h"}]}`, []string{"tier 0", "every", "not less than"}},
		{"every-decreasing", `{"tiers":[{"age":"1h","every":"1m"},{"age":"2h","every":"1s"}]}`, []string{"tier 1", "every", "not decrease"}},
		{"negative-every", `{"tiers":[{"age":"1h","every":"-1s"}]}`, []string{"tier 0", "every", "negative"}},
		{"negative-interval", `{"interval":"-1s","tiers":[{"age":"1h"}]}`, []string{"interval", "negative"}},
		{"negative-cap", `{"cap":-1,"tiers":[{"age":"1h"}]}`, []string{"cap", "negative"}},
		{"trailing", `{"tiers":[{"age":"1h"}]} {}`, []string{"after"}},
		{"syntax", `{"tiers":`, []string{"unexpected EOF"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			file := write(c.name+".json", c.body)
			_, err := LoadPolicy(file)
			if err == nil {
				t.Fatalf("%s: no error", c.body)
			}
			for _, w := range append([]string{file}, c.want...) {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("%s: error %q does not mention %q", c.body, err, w)
				}
			}
		})
	}
	missing := filepath.Join(dir, "none.json")
	if _, err := LoadPolicy(missing); err == nil || !strings.Contains(err.Error(), "no preset") || !strings.Contains(err.Error(), missing) {
		t.Errorf("missing file: %v", err)
	}
}

func TestTierOf(t *testing.T) {
	db, _ := Preset("database")
	for _, c := range []struct {
		age  time.Duration
		want int
	}{
		{0, 0}, {10*time.Second - 1, 0}, {10 * time.Second, 1}, {10*time.Minute - 1, 1},
		{10 * time.Minute, 2}, {24*time.Hour - 1, 2}, {24 * time.Hour, 3}, {1000 * time.Hour, 3},
	} {
		if got := db.TierOf(c.age); got != c.want {
			t.Errorf("TierOf(%v) = %d, want %d", c.age, got, c.want)
		}
	}
}

// history is n points every step from start.
func history(start time.Time, step time.Duration, n int) []time.Time {
	times := make([]time.Time, n)
	for i := range times {
		times[i] = start.Add(time.Duration(i) * step)
	}
	return times
}

// kept is the times keep says to keep.
func kept(times []time.Time, keep []bool) []time.Time {
	var k []time.Time
	for i, t := range times {
		if keep[i] {
			k = append(k, t)
		}
	}
	return k
}

// expectPerTier counts, independently of Keep, what it should keep in each
// tier: every point in a tier whose Every is 0, else one per distinct slot
// occupied (slot = milliseconds since the Unix epoch divided by Every's,
// rounded down; the tests' times and Everys are whole milliseconds); beyond
// the last tier nothing; and the newest point.
func expectPerTier(p Policy, times []time.Time, now time.Time) []int {
	count := make([]int, len(p.Tiers)+1)
	slots := make([]map[int64]bool, len(p.Tiers))
	for i, t := range times {
		tier := p.TierOf(now.Sub(t))
		switch {
		case tier == len(p.Tiers):
			if i == len(times)-1 {
				count[tier]++
			}
		case p.Tiers[tier].Every == 0:
			count[tier]++
		default:
			if slots[tier] == nil {
				slots[tier] = map[int64]bool{}
			}
			s := floorDiv(t.UnixMilli(), p.Tiers[tier].Every.Milliseconds())
			if i == len(times)-1 && slots[tier][s] {
				count[tier]++ // the newest, kept though not the oldest of its slot
			}
			slots[tier][s] = true
		}
	}
	for i, s := range slots {
		count[i] += len(s)
	}
	return count
}

func floorDiv(a, b int64) int64 {
	if a < 0 {
		return -((-a + b - 1) / b)
	}
	return a / b
}

func perTier(p Policy, times []time.Time, keep []bool, now time.Time) []int {
	count := make([]int, len(p.Tiers)+1)
	for i, k := range keep {
		if k {
			count[p.TierOf(now.Sub(times[i]))]++
		}
	}
	return count
}

// A history of a point every 100 ms for 30 minutes, thinned by the
// database preset at its last point.
func TestKeepTiers(t *testing.T) {
	db, _ := Preset("database")
	// 999999960 s since the epoch is a whole minute, so slots align with
	// the history's start: points 0..17999 at start+0.0s..start+1799.9s.
	aligned := time.Unix(999_999_960, 0)
	for _, c := range []struct {
		name  string
		start time.Time
		want  []int // nil: only expectPerTier
	}{
		// Now is start+1799.9s. Tier 0 (age < 10 s): points at
		// 1790.0..1799.9 s, 100 of them. Tier 1 (10 s..10 min): points at
		// 1200.0..1789.9 s, seconds 1200..1789: 590. Tier 2 (10 min..24 h):
		// points at 0..1199.9 s, minutes 0..19: 20.
		{"aligned", aligned, []int{100, 590, 20, 0}},
		{"unaligned", aligned.Add(37*time.Second + 350*time.Millisecond), nil},
		{"before-1970", time.Unix(-3600-13, 0), nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			times := history(c.start, 100*time.Millisecond, 30*60*10)
			now := times[len(times)-1]
			keep := db.Keep(times, now)
			got := perTier(db, times, keep, now)
			if c.want != nil && !slices.Equal(got, c.want) {
				t.Errorf("kept per tier %v, want %v", got, c.want)
			}
			if want := expectPerTier(db, times, now); !slices.Equal(got, want) {
				t.Errorf("kept per tier %v, want %v (independent count)", got, want)
			}
			// About 100, about one a second, about one a minute.
			if got[0] != 100 || got[1] < 589 || got[1] > 591 || got[2] < 20 || got[2] > 21 {
				t.Errorf("kept per tier %v, far from 100, 590, 20", got)
			}
			// In a coarse tier the point kept is the oldest of its slot.
			for i, k := range keep {
				tier := db.TierOf(now.Sub(times[i]))
				if !k || tier == len(db.Tiers) || db.Tiers[tier].Every == 0 || i == 0 {
					continue
				}
				prev := times[i-1]
				e := db.Tiers[tier].Every
				if db.TierOf(now.Sub(prev)) == tier && floorDiv(prev.UnixMilli(), e.Milliseconds()) == floorDiv(times[i].UnixMilli(), e.Milliseconds()) {
					t.Fatalf("kept point %d at %v, not the oldest of its slot", i, times[i])
				}
			}
		})
	}
}

func TestKeepEdges(t *testing.T) {
	db, _ := Preset("database")
	now := time.Unix(1_999_999_980, 0) // a whole minute
	if got := db.Keep(nil, now); len(got) != 0 {
		t.Errorf("Keep(nil) = %v", got)
	}
	for _, c := range []struct {
		name string
		ages []time.Duration // oldest first
		want []bool
	}{
		{"lone point older than every tier", []time.Duration{48 * time.Hour}, []bool{true}},
		{"newest kept beyond the tiers", []time.Duration{50 * time.Hour, 49 * time.Hour}, []bool{false, true}},
		{"beyond the tiers dropped", []time.Duration{25 * time.Hour, time.Hour, 0}, []bool{false, true, true}},
		{"equal times in tier 0 all kept", []time.Duration{time.Second, time.Second, 0}, []bool{true, true, true}},
		{"equal times in a coarse tier: the first", []time.Duration{time.Hour, time.Hour, 0}, []bool{true, false, true}},
		{"one per minute slot", []time.Duration{time.Hour + 30*time.Second, time.Hour + 20*time.Second, time.Hour - 30*time.Second, 0},
			[]bool{true, false, true, true}},
	} {
		var times []time.Time
		for _, a := range c.ages {
			times = append(times, now.Add(-a))
		}
		if got := db.Keep(times, now); !slices.Equal(got, c.want) {
			t.Errorf("%s: Keep %v, want %v", c.name, got, c.want)
		}
	}
}

// Keep is idempotent at one now, and later thinning only removes.
func TestKeepStable(t *testing.T) {
	for _, name := range PresetNames() {
		p, _ := Preset(name)
		t.Run(name, func(t *testing.T) {
			start := time.Unix(1_500_000_000, 0).Add(123 * time.Millisecond)
			times := history(start, 700*time.Millisecond, 3*3600*10/7) // about 3 h
			now := times[len(times)-1]
			survivors := kept(times, p.Keep(times, now))
			again := p.Keep(survivors, now)
			if i := slices.Index(again, false); i >= 0 {
				t.Fatalf("point %d (%v) kept once, dropped when thinned again at the same now", i, survivors[i])
			}
			// Later, on the survivors only.
			prev := survivors
			for _, later := range []time.Duration{time.Second, 7 * time.Second, time.Minute, 10 * time.Minute, 25 * time.Hour, 200 * time.Hour} {
				at := now.Add(later)
				keep := p.Keep(prev, at)
				next := kept(prev, keep)
				if !keep[len(keep)-1] {
					t.Errorf("+%v: newest point dropped", later)
				}
				// A subset of the survivors, in order.
				j := 0
				for _, x := range next {
					for j < len(prev) && !prev[j].Equal(x) {
						j++
					}
					if j == len(prev) {
						t.Fatalf("+%v: kept %v, not among the survivors", later, x)
					}
				}
				if i := slices.Index(p.Keep(next, at), false); i >= 0 {
					t.Errorf("+%v: point %d not kept when thinned again", later, i)
				}
				// Exactly one per occupied slot (or every point) per tier.
				if got, want := perTier(p, prev, keep, at), expectPerTier(p, prev, at); !slices.Equal(got, want) {
					t.Errorf("+%v: kept per tier %v, want %v", later, got, want)
				}
				prev = next
			}
			if len(prev) != 1 {
				t.Errorf("after 200 h past the last tier: %d points left, want the newest only", len(prev))
			}
		})
	}
}

func TestShed(t *testing.T) {
	db, _ := Preset("database")
	now := time.Unix(2_000_000_000, 0)
	at := func(ages ...time.Duration) []time.Time {
		var times []time.Time
		for _, a := range ages {
			times = append(times, now.Add(-a))
		}
		return times
	}
	for _, c := range []struct {
		name      string
		times     []time.Time
		idx, tier int
	}{
		{"none", nil, -1, -1},
		{"one", at(time.Hour), -1, -1},
		{"one beyond the tiers", at(48 * time.Hour), -1, -1},
		{"two: never the newest", at(time.Second, 0), 0, 0},
		{"two beyond the tiers: never the newest", at(49*time.Hour, 48*time.Hour), 0, 3},
		{"oldest of the oldest tier", at(time.Hour+time.Minute, time.Hour, time.Minute, time.Second, 0), 0, 2},
		{"beyond the last tier first", at(30*time.Hour, 25*time.Hour, time.Hour, 0), 0, 3},
		{"equal times: the first", at(time.Minute, time.Minute, 0), 0, 1},
	} {
		idx, tier := db.Shed(c.times, now)
		if idx != c.idx || tier != c.tier {
			t.Errorf("%s: Shed = %d (tier %d), want %d (tier %d)", c.name, idx, tier, c.idx, c.tier)
		}
	}
	// Shedding repeatedly empties the oldest tier first, down to the newest.
	times := history(now.Add(-2*time.Hour), 10*time.Second, 2*360+1)
	lastTier := len(db.Tiers)
	for len(times) > 1 {
		idx, tier := db.Shed(times, now)
		if idx != 0 || tier > lastTier {
			t.Fatalf("Shed = %d (tier %d) with %d points, the oldest in tier %d", idx, tier, len(times), db.TierOf(now.Sub(times[0])))
		}
		lastTier = tier
		times = slices.Delete(times, idx, idx+1)
	}
	if idx, _ := db.Shed(times, now); idx != -1 {
		t.Errorf("Shed of the newest alone = %d", idx)
	}
}
