package testvm

import "testing"

func TestNamePage(t *testing.T) {
	l := newLayout(32<<20, 2)
	tests := []struct {
		name string
		gpa  uint64
		want string
	}{
		{name: "params", gpa: paramsAddr + 8, want: "params page"},
		{name: "status 1", gpa: statusAddr + statusStride + 100, want: "status page of vCPU 1"},
		{name: "PML4", gpa: ptAddr, want: "page tables: PML4"},
		{name: "PD 0", gpa: ptAddr + 2*pageSize, want: "page tables: PD of GiB 0"},
		{name: "code", gpa: codeAddr + 0x2345, want: "code +0x2000"},
		{name: "stack 0", gpa: stackAddr + 0xf000, want: "stack of vCPU 0 +0xf000"},
		{name: "stack 1", gpa: stackAddr + stackSize, want: "stack of vCPU 1 +0x0"},
		{name: "tx ring", gpa: netTxAddr + 0x1000, want: "network TX ring +0x1000"},
		{name: "disk header", gpa: diskAddr + 64, want: "block device header"},
		{name: "disk ring", gpa: diskRingAddr + 0x40, want: "block device ring"},
		{name: "disk buffer", gpa: diskBufAddr + 3*pageSize + 5, want: "block device buffer 3"},
		{name: "low data", gpa: DataAddr, want: "workload region of vCPU 0, page 0"},
		// Slot 1 starts at 4 GiB and holds memory from offset 16 MiB; each
		// region is (32 MiB - 4 MiB) / 2 = 3584 pages.
		{name: "high data", gpa: highGPA + 0x1000, want: "workload region of vCPU 0, page 3073"},
		{name: "region 1", gpa: highGPA + 2<<20 + 0x3000, want: "workload region of vCPU 1, page 3"},
		{name: "hole", gpa: 1 << 30, want: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got string
			if off, ok := l.offset(tt.gpa); ok {
				got = l.namePage(off, 2)
			}
			if got != tt.want {
				t.Errorf("name of GPA %#x = %q, want %q", tt.gpa, got, tt.want)
			}
		})
	}
}
