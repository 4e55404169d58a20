package history

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"time"
)

// Tier keeps, among the points younger than Age, one per Every: the oldest
// point of each Every-long slot of wall time, slots aligned to multiples of
// Every since the Unix epoch. Every 0 keeps every point.
//
// In JSON both durations are Go duration strings: {"age": "10m", "every": "1s"}.
type Tier struct {
	Age   time.Duration `json:"age"`
	Every time.Duration `json:"every"`
}

// Policy says how often a point is taken and how long points are kept.
//
// In JSON the durations are Go duration strings ("10s", "1m", "24h") and
// unknown fields are rejected:
//
//	{"name": "batch", "interval": "5s", "loss": "5 s of work", "cap": 0,
//	 "tiers": [{"age": "1h", "every": "0s"}, {"age": "24h", "every": "10m"}]}
type Policy struct {
	Name string `json:"name"`
	// Interval: a point is taken at most this often; 0 means every
	// checkpoint.
	Interval time.Duration `json:"interval"`
	// Tiers, by increasing Age; points older than the last tier's Age are
	// dropped (but the newest point is always kept).
	Tiers []Tier `json:"tiers"`
	// Loss is the data loss this kind of VM tolerates, in words
	// (documentation, shown by `repagent history`).
	Loss string `json:"loss"`
	// Cap is the store's size cap in bytes, 0 none: past it the oldest
	// point of the oldest tier is dropped (Shed), and again, until it fits.
	Cap int64 `json:"cap"`
}

// presetDatabase is for database servers. A database can lose no committed
// transaction: every checkpoint becomes a point, so that damage (a bad
// migration, a dropped table) rolls back to the epoch just before it. It
// keeps every point for 10 s, one a second for 10 min, one a minute for a
// day.
var presetDatabase = Policy{
	Name:     "database",
	Interval: 0,
	Tiers: []Tier{
		{Age: 10 * time.Second, Every: 0},
		{Age: 10 * time.Minute, Every: time.Second},
		{Age: 24 * time.Hour, Every: time.Minute},
	},
	Loss: "no committed transaction: every checkpoint is a point, and a rollback goes back to the epoch before the damage " +
		"(any epoch of the last 10 s, any second of the last 10 min, any minute of the last day)",
}

// presetAppServer is for application servers. Their state is mostly rebuilt
// from their database; a second of lost session state is tolerated, so a
// point is taken at most once a second. It keeps every point (one a
// second) for 10 min, one a minute for a day, one an hour for a week.
var presetAppServer = Policy{
	Name:     "app-server",
	Interval: time.Second,
	Tiers: []Tier{
		{Age: 10 * time.Minute, Every: 0},
		{Age: 24 * time.Hour, Every: time.Minute},
		{Age: 7 * 24 * time.Hour, Every: time.Hour},
	},
	Loss: "up to 1 s of session state (the rest is rebuilt from the database); " +
		"points every second for 10 min, every minute for a day, every hour for a week",
}

// presetLoadBalancer is for load balancers and proxies. They are nearly
// stateless: connection tables rebuild and configuration changes rarely,
// so a point is taken at most every 10 s. It keeps every point for 10 min,
// one per 10 min for a day.
var presetLoadBalancer = Policy{
	Name:     "load-balancer",
	Interval: 10 * time.Second,
	Tiers: []Tier{
		{Age: 10 * time.Minute, Every: 0},
		{Age: 24 * time.Hour, Every: 10 * time.Minute},
	},
	Loss: "up to 10 s of connection state (connection tables rebuild, clients reconnect; configuration changes rarely); " +
		"points every 10 s for 10 min, every 10 min for a day",
}

var presets = map[string]Policy{
	presetDatabase.Name:     presetDatabase,
	presetAppServer.Name:    presetAppServer,
	presetLoadBalancer.Name: presetLoadBalancer,
}

// Preset returns the preset policy of that name: "app-server", "database"
// or "load-balancer".
func Preset(name string) (Policy, bool) {
	p, ok := presets[name]
	p.Tiers = slices.Clone(p.Tiers)
	return p, ok
}

// PresetNames lists the presets' names, sorted.
func PresetNames() []string {
	n := make([]string, 0, len(presets))
	for k := range presets {
		n = append(n, k)
	}
	slices.Sort(n)
	return n
}

// LoadPolicy returns the preset of that name, or else reads a policy from
// the JSON file at that path (see Policy) and validates it. A file's policy
// without a name is named after the file.
func LoadPolicy(nameOrFile string) (Policy, error) {
	if p, ok := Preset(nameOrFile); ok {
		return p, nil
	}
	b, err := os.ReadFile(nameOrFile)
	if err != nil {
		return Policy{}, fmt.Errorf("policy %q is no preset (%s) and no readable file: %w",
			nameOrFile, strings.Join(PresetNames(), ", "), err)
	}
	var p Policy
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&p); err != nil {
		return Policy{}, fmt.Errorf("policy file %s: %w", nameOrFile, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return Policy{}, fmt.Errorf("policy file %s: data after the policy object", nameOrFile)
	}
	if p.Name == "" {
		p.Name = nameOrFile
	}
	if err := p.Validate(); err != nil {
		return Policy{}, fmt.Errorf("policy file %s: %w", nameOrFile, err)
	}
	return p, nil
}

// tierJSON and policyJSON are the JSON forms, durations as strings.
type tierJSON struct {
	Age   string `json:"age"`
	Every string `json:"every"`
}

type policyJSON struct {
	Name     string     `json:"name"`
	Interval string     `json:"interval"`
	Tiers    []tierJSON `json:"tiers"`
	Loss     string     `json:"loss"`
	Cap      int64      `json:"cap"`
}

// parseDur parses a duration field; "" is 0.
func parseDur(field, s string) (time.Duration, error) {
	if s == "" {
		return 0, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("%s: %q is no duration (want a Go duration such as \"10s\", \"1m\", \"24h\")", field, s)
	}
	return d, nil
}

// strictUnmarshal decodes b into v rejecting unknown fields (a Decoder's
// DisallowUnknownFields does not reach into an UnmarshalJSON method).
func strictUnmarshal(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}

func (t tierJSON) tier(prefix string) (Tier, error) {
	age, err := parseDur(prefix+"age", t.Age)
	if err != nil {
		return Tier{}, err
	}
	every, err := parseDur(prefix+"every", t.Every)
	if err != nil {
		return Tier{}, err
	}
	return Tier{Age: age, Every: every}, nil
}

// MarshalJSON writes the durations as Go duration strings.
func (t Tier) MarshalJSON() ([]byte, error) {
	return json.Marshal(tierJSON{Age: shortDur(t.Age), Every: shortDur(t.Every)})
}

// UnmarshalJSON reads the durations as Go duration strings, rejecting
// unknown fields.
func (t *Tier) UnmarshalJSON(b []byte) error {
	var j tierJSON
	if err := strictUnmarshal(b, &j); err != nil {
		return fmt.Errorf("tier: %w", err)
	}
	v, err := j.tier("tier ")
	if err != nil {
		return err
	}
	*t = v
	return nil
}

// MarshalJSON writes the durations as Go duration strings.
func (p Policy) MarshalJSON() ([]byte, error) {
	j := policyJSON{Name: p.Name, Interval: shortDur(p.Interval), Loss: p.Loss, Cap: p.Cap, Tiers: []tierJSON{}}
	for _, t := range p.Tiers {
		j.Tiers = append(j.Tiers, tierJSON{Age: shortDur(t.Age), Every: shortDur(t.Every)})
	}
	return json.Marshal(j)
}

// UnmarshalJSON reads the durations as Go duration strings, rejecting
// unknown fields; it does not validate (LoadPolicy does).
func (p *Policy) UnmarshalJSON(b []byte) error {
	var j policyJSON
	if err := strictUnmarshal(b, &j); err != nil {
		return err
	}
	v := Policy{Name: j.Name, Loss: j.Loss, Cap: j.Cap}
	var err error
	if v.Interval, err = parseDur("interval", j.Interval); err != nil {
		return err
	}
	for i, tj := range j.Tiers {
		t, err := tj.tier(fmt.Sprintf("tier %d: ", i))
		if err != nil {
			return err
		}
		v.Tiers = append(v.Tiers, t)
	}
	*p = v
	return nil
}

// shortDur is d as a Go duration string without trailing zero units:
// "10m", "24h", "1h30m", "1.5s", "0s".
func shortDur(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// Validate checks the policy: at least one tier; ages positive and strictly
// increasing; every non-negative, non-decreasing and shorter than its
// tier's age; interval and cap non-negative. Errors name the tier index
// and the field.
func (p Policy) Validate() error {
	if len(p.Tiers) == 0 {
		return errors.New("tiers: none; a policy keeps points in at least one tier")
	}
	if p.Interval < 0 {
		return fmt.Errorf("interval: %v is negative", p.Interval)
	}
	if p.Cap < 0 {
		return fmt.Errorf("cap: %d is negative", p.Cap)
	}
	for i, t := range p.Tiers {
		switch {
		case t.Age <= 0:
			return fmt.Errorf("tier %d: age %s is not positive", i, shortDur(t.Age))
		case i > 0 && t.Age <= p.Tiers[i-1].Age:
			return fmt.Errorf("tier %d: age %s is not greater than tier %d's age %s (ages must strictly increase)",
				i, shortDur(t.Age), i-1, shortDur(p.Tiers[i-1].Age))
		case t.Every < 0:
			return fmt.Errorf("tier %d: every %s is negative", i, shortDur(t.Every))
		case i > 0 && t.Every < p.Tiers[i-1].Every:
			return fmt.Errorf("tier %d: every %s is less than tier %d's every %s (every must not decrease)",
				i, shortDur(t.Every), i-1, shortDur(p.Tiers[i-1].Every))
		case t.Every >= t.Age:
			return fmt.Errorf("tier %d: every %s is not less than the tier's age %s", i, shortDur(t.Every), shortDur(t.Age))
		}
	}
	return nil
}

// String is the policy in one line, for example
//
//	database: a point every checkpoint; every point for 10s, 1/1s for 10m, 1/1m for 24h; no cap
func (p Policy) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s: ", p.Name)
	if p.Interval == 0 {
		b.WriteString("a point every checkpoint; ")
	} else {
		fmt.Fprintf(&b, "a point at most every %s; ", shortDur(p.Interval))
	}
	for i, t := range p.Tiers {
		if i > 0 {
			b.WriteString(", ")
		}
		if t.Every == 0 {
			fmt.Fprintf(&b, "every point for %s", shortDur(t.Age))
		} else {
			fmt.Fprintf(&b, "1/%s for %s", shortDur(t.Every), shortDur(t.Age))
		}
	}
	if p.Cap > 0 {
		fmt.Fprintf(&b, "; cap %d bytes", p.Cap)
	} else {
		b.WriteString("; no cap")
	}
	return b.String()
}

// TierOf is the index of the tier a point of that age falls in (the first
// whose Age is greater), len(Tiers) if it is older than all.
func (p Policy) TierOf(age time.Duration) int {
	for i, t := range p.Tiers {
		if age < t.Age {
			return i
		}
	}
	return len(p.Tiers)
}

// slot is the Every-long slot of wall time t falls in, aligned to
// multiples of every since the Unix epoch (floor, also before 1970).
func slot(t time.Time, every time.Duration) int64 {
	n := t.UnixNano()
	s := n / int64(every)
	if n%int64(every) < 0 {
		s--
	}
	return s
}

// Keep says which points to keep at now. times are the points' wall times,
// oldest first (sorted ascending; they may be equal). A point is kept if it
// is the oldest point of its slot in its tier (every point of a tier whose
// Every is 0); points older than every tier are dropped, but the newest
// point is always kept.
//
// Applying Keep to the points it kept, at the same now, keeps them all.
func (p Policy) Keep(times []time.Time, now time.Time) []bool {
	keep := make([]bool, len(times))
	type key struct {
		tier int
		slot int64
	}
	seen := make(map[key]bool)
	for i, t := range times {
		tier := p.TierOf(now.Sub(t))
		if tier == len(p.Tiers) {
			continue
		}
		every := p.Tiers[tier].Every
		if every == 0 {
			keep[i] = true
			continue
		}
		k := key{tier, slot(t, every)}
		if !seen[k] {
			seen[k], keep[i] = true, true
		}
	}
	if len(keep) > 0 {
		keep[len(keep)-1] = true
	}
	return keep
}

// Shed picks the point to drop next when the store is over its cap: the
// oldest point of the oldest non-empty tier (points beyond the last tier
// count as the oldest tier, index len(Tiers)), never the newest point (the
// last). It returns the point's index and its tier's index; -1, -1 if there
// is only one point or none.
func (p Policy) Shed(times []time.Time, now time.Time) (idx, tier int) {
	if len(times) < 2 {
		return -1, -1
	}
	idx, tier = -1, -1
	for i, t := range times[:len(times)-1] {
		tr := p.TierOf(now.Sub(t))
		if tr > tier || (tr == tier && t.Before(times[idx])) {
			idx, tier = i, tr
		}
	}
	return idx, tier
}
