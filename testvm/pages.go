package testvm

import "fmt"

// NamePage says what the guest keeps in the page at guest-physical address
// gpa: "status page of vCPU 0", "stack of vCPU 1 +0x3000", "code +0x2000",
// and so on; "" for an address in no slot. It implements replicate.PageNamer,
// so that an audit that finds pages missed by dirty tracking names them.
func (m *Machine) NamePage(gpa uint64) string {
	off, ok := m.layout.offset(gpa)
	if !ok {
		return ""
	}
	return m.layout.namePage(off, len(m.vcpus))
}

// offset maps a guest-physical address to its memory offset (= guest-virtual
// address); false for an address in no slot.
func (l layout) offset(gpa uint64) (uint64, bool) {
	switch {
	case gpa < l.lowSize:
		return gpa, true
	case gpa >= highGPA && gpa-highGPA < l.memSize-l.lowSize:
		return gpa - highGPA + l.lowSize, true
	}
	return 0, false
}

// namePage names what lives at memory offset off in a machine of vcpus vCPUs.
func (l layout) namePage(off uint64, vcpus int) string {
	page := off &^ (pageSize - 1)
	in := func(start, size uint64) bool { return off >= start && off-start < size }
	switch {
	case page == 0:
		return "page 0 (unused)"
	case page == gdtAddr:
		return "GDT"
	case page == tssAddr:
		return "TSS"
	case page == paramsAddr:
		return "params page"
	case in(statusAddr, MaxVCPUs*statusStride):
		i := (off - statusAddr) / statusStride
		if int(i) >= vcpus {
			return fmt.Sprintf("status page of absent vCPU %d", i)
		}
		return fmt.Sprintf("status page of vCPU %d", i)
	case page == ptAddr:
		return "page tables: PML4"
	case page == ptAddr+pageSize:
		return "page tables: PDPT"
	case in(ptAddr+2*pageSize, (l.memSize+(1<<30-1))>>30*pageSize):
		return fmt.Sprintf("page tables: PD of GiB %d", (page-ptAddr-2*pageSize)/pageSize)
	case in(codeAddr, codeMax):
		return fmt.Sprintf("code +%#x", page-codeAddr)
	case in(stackAddr, MaxVCPUs*stackSize):
		i := (off - stackAddr) / stackSize
		return fmt.Sprintf("stack of vCPU %d +%#x", i, page-stackAddr-i*stackSize)
	case page == netAddr:
		return "network device header"
	case in(netTxAddr, netSlots*netSlotSize):
		return fmt.Sprintf("network TX ring +%#x", page-netTxAddr)
	case in(netRxAddr, netSlots*netSlotSize):
		return fmt.Sprintf("network RX ring +%#x", page-netRxAddr)
	case page == diskAddr:
		return "block device header"
	case page == diskRingAddr:
		return "block device ring"
	case in(diskBufAddr, diskBufSize):
		return fmt.Sprintf("block device buffer %d", (page-diskBufAddr)/pageSize)
	case off >= DataAddr && l.regionPages > 0:
		i := (off - DataAddr) / pageSize / l.regionPages
		if int(i) >= vcpus {
			return "memory past the workload regions"
		}
		return fmt.Sprintf("workload region of vCPU %d, page %d", i, (off-l.regionBase(int(i)))/pageSize)
	}
	return "unused low memory"
}
