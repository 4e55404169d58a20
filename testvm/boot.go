package testvm

import (
	"encoding/binary"

	"github.com/repagent/repagent/kvm"
)

// Page-table entry flags: present, writable, user, accessed, dirty, 2 MiB.
// A and D are preset so the MMU never writes the tables (which would show up
// as dirty pages no workload wrote).
const (
	ptePresent = 1 << 0
	pteWrite   = 1 << 1
	pteUser    = 1 << 2
	pteAccess  = 1 << 5
	pteDirty   = 1 << 6
	pteHuge    = 1 << 7
	pteTable   = ptePresent | pteWrite | pteUser | pteAccess
	pteLeaf    = pteTable | pteDirty | pteHuge
)

// writeBootTables writes the GDT, TSS and page tables into guest memory.
// Guest-virtual [0, memSize) maps to the slots through l.gpa.
func writeBootTables(mem []byte, l layout) {
	le := binary.LittleEndian
	// GDT: null, 64-bit code DPL3 (0x08), data DPL3 (0x10), 64-bit TSS (0x18,
	// two slots). Accessed bits are preset, the TSS is marked busy.
	gdt := mem[gdtAddr:]
	le.PutUint64(gdt[0:], 0)
	le.PutUint64(gdt[8:], 0x00affb000000ffff)
	le.PutUint64(gdt[16:], 0x00cff3000000ffff)
	tss := uint64(tssAddr)
	lo := uint64(tssLimit) | (tss&0xffffff)<<16 | uint64(0x8b)<<40 | (tss>>24&0xff)<<56
	le.PutUint64(gdt[24:], lo)
	le.PutUint64(gdt[32:], tss>>32)
	// TSS: no stacks (no interrupts are ever delivered), and an I/O permission
	// bitmap right after the 104-byte TSS that allows ports 0..ioPorts-1 (all
	// bits zero); ports past the limit are denied.
	le.PutUint16(mem[tssAddr+0x66:], tssIOMap)
	clear(mem[tssAddr+tssIOMap : tssAddr+tssLimit+1])

	// Page tables: PML4 -> one PDPT -> one PD per GiB of virtual space.
	pml4 := uint64(ptAddr)
	pdpt := pml4 + pageSize
	pd0 := pdpt + pageSize
	le.PutUint64(mem[pml4:], pdpt|pteTable)
	gibs := (l.memSize + (1<<30 - 1)) >> 30
	for g := uint64(0); g < gibs; g++ {
		pd := pd0 + g*pageSize
		le.PutUint64(mem[pdpt+g*8:], pd|pteTable)
		for e := uint64(0); e < 512; e++ {
			virt := g<<30 | e<<21
			if virt >= l.memSize {
				break
			}
			le.PutUint64(mem[pd+e*8:], l.gpa(virt)|pteLeaf)
		}
	}
}

// How CPL3 code may do port I/O. PLATFORM.md suggests RFLAGS.IOPL=3, but PVM
// enters the guest with IOPL masked out of the hardware flags and copies them
// back on exit, so after the first exit the guest's IOPL reads 0, and PVM's
// emulation of the trapped OUT then consults the TSS I/O permission bitmap. A
// bitmap that allows the test VM's ports works on PVM and on VMX/SVM alike, so
// it is the one mechanism used.
const (
	tssIOMap = 0x68                     // I/O map base: right after the 64-bit TSS
	ioPorts  = 0x800                    // ports 0..0x7ff are allowed
	tssLimit = tssIOMap + ioPorts/8 + 1 // the bitmap plus the 0xff byte the CPU may read past it, minus 1
)

// bootSregs returns the segment and control registers that start a vCPU in
// 64-bit mode at CPL3, as PLATFORM.md describes.
func bootSregs(s *kvm.Sregs) {
	code := kvm.Segment{Base: 0, Limit: 0xffffffff, Selector: 0x0b, Type: 11, Present: 1, DPL: 3, S: 1, L: 1, G: 1}
	data := kvm.Segment{Base: 0, Limit: 0xffffffff, Selector: 0x13, Type: 3, Present: 1, DPL: 3, DB: 1, S: 1, G: 1}
	s.CS = code
	s.DS, s.ES, s.FS, s.GS, s.SS = data, data, data, data, data
	s.TR = kvm.Segment{Base: tssAddr, Limit: tssLimit, Selector: 0x18, Type: 11, Present: 1}
	s.LDT = kvm.Segment{Selector: 0, Type: 2, Present: 1, Unusable: 1}
	s.GDT = kvm.DTable{Base: gdtAddr, Limit: 5*8 - 1}
	s.IDT = kvm.DTable{}
	s.CR0 = 0x80050033 // PG, AM, WP, NE, ET, MP, PE
	s.CR3 = ptAddr
	s.CR4 = 0x620  // OSXMMEXCPT, OSFXSR, PAE
	s.EFER = 0xd00 // NXE, LMA, LME
}

// bootRegs returns the registers at guest entry for vCPU i.
func bootRegs(i int) kvm.Regs {
	return kvm.Regs{
		RIP:    codeAddr,
		RSP:    stackAddr + uint64(i+1)*stackSize,
		RDI:    uint64(i),
		RFLAGS: 0x2, // reserved bit 1; port I/O is allowed by the TSS bitmap
	}
}

// vcpuCPUID adapts the supported CPUID leaves for vCPU i: its APIC ID in leaf
// 1 and the x2APIC ID in leaves 0xb and 0x1f.
func vcpuCPUID(supported []kvm.CPUIDEntry2, i int) []kvm.CPUIDEntry2 {
	out := append([]kvm.CPUIDEntry2(nil), supported...)
	for j := range out {
		switch out[j].Function {
		case 1:
			out[j].EBX = out[j].EBX&0x00ffffff | uint32(i)<<24
		case 0xb, 0x1f:
			out[j].EDX = uint32(i)
		}
	}
	return out
}

// writeParams fills the params page.
func writeParams(mem []byte, c Config, l layout, tscKHz uint32) {
	le := binary.LittleEndian
	p := mem[paramsAddr : paramsAddr+pageSize]
	clear(p)
	le.PutUint64(p[pMagic:], paramsMagic)
	le.PutUint32(p[pABIVersion:], abiVersion)
	le.PutUint32(p[pNrVCPUs:], uint32(c.VCPUs))
	le.PutUint32(p[pWorkload:], uint32(c.Workload))
	le.PutUint32(p[pPattern:], uint32(c.Pattern))
	le.PutUint32(p[pContent:], uint32(c.Content))
	le.PutUint64(p[pTSCKHz:], uint64(tscKHz))
	le.PutUint64(p[pRate:], c.Rate)
	le.PutUint64(p[pSeed:], c.Seed)
	le.PutUint64(p[pPhaseOps:], c.PhaseOps)
	le.PutUint32(p[pHotPct:], c.HotPercent)
	le.PutUint32(p[pHotWritePct:], c.HotWritePercent)
	le.PutUint64(p[pIdleTickUs:], c.IdleTickMicros)
	if n := c.Net; n != nil {
		var mac [8]byte
		copy(mac[:], n.MAC)
		copy(p[pNetMAC:pNetMAC+8], mac[:])
		ip := n.IP.As4()
		copy(p[pNetIP:pNetIP+4], ip[:])
		le.PutUint32(p[pNetPort:], uint32(n.Port))
		le.PutUint64(p[pStreamRate:], n.StreamRate)
		le.PutUint32(p[pStreamBytes:], n.StreamBytes)
		le.PutUint32(p[pNetFlags:], netPresent)
		le.PutUint32(p[pNetService:], uint32(n.Service))
	}
	if d := c.Disk; d != nil {
		le.PutUint64(p[pDiskBlocks:], d.Blocks)
		le.PutUint64(p[pDiskWS:], d.WorkingSet)
		le.PutUint64(p[pDiskFlush:], d.FlushEvery)
		le.PutUint32(p[pDiskFlags:], diskPresent)
	}
	ws := c.WorkingSet
	if ws == 0 {
		ws = l.regionPages
	}
	for i := 0; i < c.VCPUs; i++ {
		v := p[pVCPU+i*pVCPUStride:]
		le.PutUint64(v[pvBase:], l.regionBase(i))
		le.PutUint64(v[pvPages:], l.regionPages)
		le.PutUint64(v[pvWorkingSet:], ws)
	}
}
