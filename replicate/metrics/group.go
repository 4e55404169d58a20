package metrics

import "github.com/prometheus/client_golang/prometheus"

// group makes a collector's metrics and collects them, in the order they
// were made. A collector embeds it for Describe and Collect.
type group struct {
	all []prometheus.Collector
}

func (g *group) add(m prometheus.Collector) { g.all = append(g.all, m) }

func (g *group) counter(name, help string) prometheus.Counter {
	m := prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Name: name, Help: help})
	g.add(m)
	return m
}

func (g *group) gauge(name, help string) prometheus.Gauge {
	m := prometheus.NewGauge(prometheus.GaugeOpts{Namespace: Namespace, Name: name, Help: help})
	g.add(m)
	return m
}

func (g *group) histogram(name, help string) prometheus.Histogram {
	m := prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: Namespace, Name: name, Help: help, Buckets: Buckets})
	g.add(m)
	return m
}

// counters makes a counter with one label, and its children for values, in
// order, resolved now so that counting does not look them up.
func (g *group) counters(name, help, label string, values ...string) (*prometheus.CounterVec, []prometheus.Counter) {
	m := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Name: name, Help: help}, []string{label})
	g.add(m)
	cs := make([]prometheus.Counter, len(values))
	for i, v := range values {
		cs[i] = m.WithLabelValues(v)
	}
	return m, cs
}

// histograms is counters for histograms.
func (g *group) histograms(name, help, label string, values ...string) []prometheus.Observer {
	m := prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: Namespace, Name: name, Help: help, Buckets: Buckets}, []string{label})
	g.add(m)
	hs := make([]prometheus.Observer, len(values))
	for i, v := range values {
		hs[i] = m.WithLabelValues(v)
	}
	return hs
}

// Describe implements prometheus.Collector.
func (g *group) Describe(ch chan<- *prometheus.Desc) {
	for _, m := range g.all {
		m.Describe(ch)
	}
}

// Collect implements prometheus.Collector.
func (g *group) Collect(ch chan<- prometheus.Metric) {
	for _, m := range g.all {
		m.Collect(ch)
	}
}

var (
	_ prometheus.Collector = (*PrimaryCollector)(nil)
	_ prometheus.Collector = (*BackupCollector)(nil)
)
