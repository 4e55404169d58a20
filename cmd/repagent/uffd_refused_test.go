package main

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/repagent/repagent/internal/privileged"
)

// denyUffdEnv, set to an errno, makes this test binary a launcher: it has
// the kernel refuse userfaultfd(2) with that errno (a seccomp filter, kept
// across exec) and execs the rest of its arguments.
const denyUffdEnv = "REPAGENT_TEST_DENY_USERFAULTFD"

func TestMain(m *testing.M) {
	if v := os.Getenv(denyUffdEnv); v != "" {
		os.Exit(execDenyingUffd(v, os.Args[1:]))
	}
	os.Exit(m.Run())
}

// execDenyingUffd installs a seccomp filter on this thread that fails
// userfaultfd(2) with errno and execs args; it returns only on failure.
func execDenyingUffd(errno string, args []string) int {
	e, err := strconv.Atoi(errno)
	if err != nil || len(args) == 0 {
		fmt.Fprintf(os.Stderr, "%s=%q: want an errno, and a command after it\n", denyUffdEnv, errno)
		return 2
	}
	runtime.LockOSThread() // the filter is this thread's; exec keeps it
	const (
		offNr   = 0 // struct seccomp_data
		offArch = 4
		retErr  = 0x00050000 // SECCOMP_RET_ERRNO
	)
	prog := []unix.SockFilter{
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: offArch},
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jt: 0, Jf: 3, K: unix.AUDIT_ARCH_X86_64},
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: offNr},
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jt: 0, Jf: 1, K: unix.SYS_USERFAULTFD},
		{Code: unix.BPF_RET | unix.BPF_K, K: retErr | uint32(e)},
		{Code: unix.BPF_RET | unix.BPF_K, K: unix.SECCOMP_RET_ALLOW},
	}
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		fmt.Fprintf(os.Stderr, "PR_SET_NO_NEW_PRIVS: %v\n", err)
		return 2
	}
	if err := unix.Prctl(unix.PR_SET_SECCOMP, unix.SECCOMP_MODE_FILTER, uintptr(unsafe.Pointer(&fprog)), 0, 0); err != nil {
		fmt.Fprintf(os.Stderr, "PR_SET_SECCOMP: %v\n", err)
		return 2
	}
	err = syscall.Exec(args[0], args, withoutEnv(os.Environ(), denyUffdEnv))
	fmt.Fprintf(os.Stderr, "exec %s: %v\n", args[0], err)
	return 2
}

func withoutEnv(env []string, name string) []string {
	var out []string
	for _, kv := range env {
		if !strings.HasPrefix(kv, name+"=") {
			out = append(out, kv)
		}
	}
	return out
}

// runDenyingUffd runs bin with args in a process whose userfaultfd(2) the
// kernel refuses with errno.
func runDenyingUffd(t *testing.T, errno syscall.Errno, bin string, args ...string) (string, int) {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv(denyUffdEnv, strconv.Itoa(int(errno)))
	return runBin(t, self, append([]string{bin}, args...)...)
}

// When the kernel refuses userfaultfd, as one without it (ENOSYS) or a
// sandbox that forbids it (EPERM) does, --capture lazy fails before
// replicating, naming why, and --capture auto replicates copying every page
// in the pause, saying so.
func TestCaptureWithUserfaultfdRefused(t *testing.T) {
	privileged.Require(t, privileged.KVM)
	bin := buildRepagent(t)
	for _, tc := range []struct {
		errno syscall.Errno
		why   string
	}{
		{unix.ENOSYS, "userfaultfd(2): not supported"},
		{unix.EPERM, "needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1"},
	} {
		t.Run(tc.errno.Error(), func(t *testing.T) {
			job := []string{"--mem", "32M", "--no-net", "--no-disk", "--interval", "50ms", "--quiet"}
			out, code := runDenyingUffd(t, tc.errno, bin, append(job, "--capture", "lazy", "--duration", "1s")...)
			if code == 0 || !strings.Contains(out, "capture lazy") || !strings.Contains(out, tc.why) {
				t.Fatalf("--capture lazy without userfaultfd: exit %d, want a failure naming %q:\n%s", code, tc.why, out)
			}
			t.Logf("lazy: exit %d: %s", code, lastLines(out, 3))
			out, code = runDenyingUffd(t, tc.errno, bin, append(job, "--capture", "auto", "--duration", "1500ms")...)
			if code != 0 || !strings.Contains(out, "capture auto: copying every page in the pause (eager)") || !strings.Contains(out, tc.why) {
				t.Fatalf("--capture auto without userfaultfd: exit %d, want replication with a note naming %q:\n%s", code, tc.why, out)
			}
			if !strings.Contains(out, "capture auto: 0.0% of the dirty pages protected") {
				t.Fatalf("--capture auto without userfaultfd protected pages:\n%s", out)
			}
		})
	}
}

func lastLines(s string, n int) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(l[max(0, len(l)-n):], "\n")
}
