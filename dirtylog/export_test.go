package dirtylog

import "github.com/repagent/repagent/kvm"

// SetResetDirtyRings makes the trackers reset their rings with f until the
// returned function restores KVM_RESET_DIRTY_RINGS.
func SetResetDirtyRings(f func(*kvm.VM) (int, error)) (restore func()) {
	resetDirtyRings = f
	return func() { resetDirtyRings = (*kvm.VM).ResetDirtyRings }
}
