// Package kvm is a typed binding of the Linux KVM ioctls that repagent uses,
// for x86-64.
//
// Handles: System (/dev/kvm), VM and VCPU wrap their file descriptors; each is
// closed exactly once by its Close. Every ioctl number is a constant in the
// kernel's spelling (KVM_GET_REGS, ...) built the way <linux/kvm.h> builds it,
// and TestIoctlNumbers pins each one to the header's value; every struct mirror
// (Regs, Sregs, XCRs, ...) has the kernel's layout with explicit padding, and
// TestStructSizes pins its size.
//
// What is here:
//   - System: API version check, KVM_CHECK_EXTENSION, the vCPU mmap size,
//     supported CPUID, the MSR index list, VM creation.
//   - VM: memory slots, vCPU creation, in-kernel irqchip and PIT, TSS and
//     identity-map addresses, ioeventfd, irqfd, KVM_ENABLE_CAP, the clock,
//     irqchip and PIT state, and dirty tracking (KVM_GET_DIRTY_LOG,
//     KVM_CLEAR_DIRTY_LOG, KVM_RESET_DIRTY_RINGS).
//   - VCPU: the kvm_run mapping, Run, immediate_exit (the race-free kick),
//     decoded exits (Exit), get/set of every piece of vCPU state, the dirty ring
//     mapping.
//   - VMFromFD and VM.VCPUFromFD: wrappers of the fds of a VM and its vCPUs
//     that another VMM made, so that it can use dirtylog's tracker; they hold
//     duplicates and leave the VMM's own fds alone.
//   - VCPUState and VMState: a complete checkpoint of a vCPU and of the VM's
//     in-kernel devices, saved and restored in the order KVM requires, with a
//     bounded, checked binary encoding (errors name the field at fault).
//
// Errors: a call KVM does not support returns an error matching
// ErrNotSupported (errors.Is), so callers can fall back. Errors a user can meet
// say what to do ("open /dev/kvm: permission denied (run as root or add the
// user to group kvm)").
//
// Threads: KVM wants a vCPU's ioctls from one thread at a time. The package
// does not lock; the VMM runs each vCPU on its own locked OS thread and touches
// its state only while that thread is out of Run (see testvm). SetImmediateExit
// is the one call that is safe from any thread.
//
// Hot paths (Run, GetDirtyLog, ClearDirtyLog, exit decoding) do not allocate
// on success; errors are wrapped only when they happen.
package kvm
