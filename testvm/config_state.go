package testvm

import (
	"fmt"

	"github.com/repagent/repagent/internal/le"
)

// configState is the machine's own part of a state (the config and layout
// sections of the format in state.go): the guest configuration less its
// devices, whose parts carry theirs, and less its runtime fields; and the
// memory layout that configuration gives, kept so that a state from a build
// that lays memory out differently is refused rather than misread.
type configState struct {
	cfg                  Config // Net, Disk and the runtime fields are not part of it
	lowSize, regionPages uint64 // the layout
}

// newConfigState returns c's part, with the layout this build gives it.
func newConfigState(c Config) configState {
	l := newLayout(c.MemSize, c.VCPUs)
	return configState{cfg: c, lowSize: l.lowSize, regionPages: l.regionPages}
}

// appendBinary appends the config and layout sections.
func (s *configState) appendBinary(b []byte) []byte {
	c := &s.cfg
	b = appendU64(b, c.MemSize)
	b = appendU32(b, uint32(c.VCPUs), uint32(c.Workload), uint32(c.Pattern), c.HotPercent, c.HotWritePercent, uint32(c.Content))
	b = appendU64(b, c.WorkingSet, c.Rate, c.Seed, c.PhaseOps, c.IdleTickMicros)
	return appendU64(b, s.lowSize, s.regionPages)
}

// decode reads the sections appendBinary writes. The configuration is
// checked with its devices' (Config.Validate), then the layout
// (checkLayout), once every part is read.
func (s *configState) decode(r *le.Reader) {
	c := &s.cfg
	c.MemSize = r.U64("config memSize")
	c.VCPUs = int(r.U32("config vcpus"))
	c.Workload, c.Pattern = Workload(r.U32("config workload")), Pattern(r.U32("config pattern"))
	c.HotPercent, c.HotWritePercent = r.U32("config hot"), r.U32("config hotWrites")
	c.Content = Content(r.U32("config content"))
	if c.Content == 0 {
		c.Content = Stamp // saved before Content existed
	}
	c.WorkingSet, c.Rate, c.Seed = r.U64("config workingSet"), r.U64("config rate"), r.U64("config seed")
	c.PhaseOps, c.IdleTickMicros = r.U64("config phaseOps"), r.U64("config idleTick")
	s.lowSize, s.regionPages = r.U64("layout lowSize"), r.U64("layout regionPages")
}

// checkLayout reports whether the saved layout is the one this build gives
// the configuration.
func (s *configState) checkLayout() error {
	l := newLayout(s.cfg.MemSize, s.cfg.VCPUs)
	if l.lowSize != s.lowSize || l.regionPages != s.regionPages {
		return fmt.Errorf("memory layout (low %d, region %d pages) does not match this build's (%d, %d)", s.lowSize, s.regionPages, l.lowSize, l.regionPages)
	}
	return nil
}
