package testvm

// Constants of the guest ABI, mirrored from guest/abi.h. TestABIMatchesHeader
// parses the header and checks every one of them.
const (
	abiVersion = 4

	pageSize = 4096
	// MaxVCPUs is the most vCPUs the test VM supports.
	MaxVCPUs = 4

	gdtAddr      = 0x1000
	tssAddr      = 0x2000
	paramsAddr   = 0x3000
	statusAddr   = 0x4000
	statusStride = 0x1000
	ptAddr       = 0x10000
	codeAddr     = 0x100000
	codeMax      = 0x80000
	stackAddr    = 0x180000
	stackSize    = 0x10000
	netAddr      = 0x200000
	netTxAddr    = 0x201000
	netRxAddr    = 0x281000
	diskAddr     = 0x301000
	diskRingAddr = 0x302000
	diskBufAddr  = 0x380000
	diskBufSize  = 0x80000
	// DataAddr is the first byte of workload memory (guest-virtual, which is
	// also the offset into the memory file).
	DataAddr = 0x400000

	portConsole  = 0x510
	portControl  = 0x511
	portNetKick  = 0x512
	portDiskKick = 0x513

	consoleOffset = 2048
	consoleMax    = 2048

	ctrlReady = 1
	ctrlDone  = 2
	ctrlError = 3

	gerrBadParams   = 1
	gerrBadWorkload = 2
	gerrBadPattern  = 3
	gerrBadRegion   = 4
	gerrBadVCPU     = 5
	gerrBadNet      = 6
	gerrBadDisk     = 7
	gerrDiskIO      = 8
	gerrDiskVerify  = 9

	paramsMagic = 0x5041524d47504552
	statusMagic = 0x5354415447504552

	wlIdle     = 1
	wlDirty    = 2
	wlCounter  = 3
	wlUDPEcho  = 4
	wlUDPStrm  = 5
	wlDisk     = 6
	patSeq     = 1
	patRandom  = 2
	patHotcold = 3

	contentStamp  = 1
	contentText   = 2
	contentSparse = 3
	textWords     = 16

	gsBoot    = 0
	gsRunning = 1
	gsWaiting = 2
	gsError   = 3

	fillK     = 0x9e3779b97f4a7c15
	counterK  = 0xff51afd7ed558ccd
	counterH0 = 0xcbf29ce484222325

	pMagic       = 0
	pABIVersion  = 8
	pNrVCPUs     = 12
	pWorkload    = 16
	pPattern     = 20
	pTSCKHz      = 24
	pRate        = 32
	pSeed        = 40
	pPhaseOps    = 48
	pHotPct      = 56
	pHotWritePct = 60
	pGo          = 64
	pIdleTickUs  = 72
	pNetMAC      = 80
	pNetIP       = 88
	pNetPort     = 92
	pStreamRate  = 96
	pStreamBytes = 104
	pNetFlags    = 108
	pNetService  = 112
	pContent     = 116
	pVCPU        = 128
	pVCPUStride  = 32
	pvBase       = 0
	pvPages      = 8
	pvWorkingSet = 16
	pDiskBlocks  = 256
	pDiskWS      = 264
	pDiskFlush   = 272
	pDiskFlags   = 280
	sMagic       = 0
	sState       = 8
	sError       = 12
	sIterations  = 16
	sWrites      = 24
	sPhase       = 32
	sCurPage     = 40
	sCounterSeq  = 48
	sCounterSlot = 64
	sTSC         = 96
	sNetRx       = 104
	sNetTx       = 112
	sNetSeq      = 120
	sNetIgnored  = 128
	sNetPeerIP   = 136
	sNetPeerPort = 140
	sDiskWrites  = 144
	sDiskReads   = 152
	sDiskFlushes = 160
	sDiskErrors  = 168
	sDiskBatch   = 176
	sDiskBatchN  = 184
	sDiskBadBlk  = 192
	sDiskBadStat = 200

	netSlots    = 256
	netSlotSize = 2048
	netSlotData = 8
	// NetFrameMax is the largest Ethernet frame (no FCS) the network device
	// carries: a 1500-byte MTU.
	NetFrameMax = 1514
	nTxProd     = 0
	nTxCons     = 64
	nTxKick     = 68
	nRxProd     = 128
	nRxCons     = 192
	netPresent  = 1

	diskSlots    = 128
	diskDescSize = 32
	// DiskBlockSize is the block size of the block device: the unit of its
	// requests, and of DiskConfig.Blocks.
	DiskBlockSize = 4096
	dkReqProd     = 0
	dkReqCons     = 64
	dkKick        = 68
	dOp           = 0
	dFlags        = 4
	dBlock        = 8
	dCount        = 16
	dStatus       = 20
	dBuf          = 24
	diskOpRead    = 1
	diskOpWrite   = 2
	diskOpFlush   = 3
	diskFFUA      = 1
	diskSOK       = 1
	diskSBadOp    = 2
	diskSBadRange = 3
	diskSBadBuf   = 4
	diskSIOError  = 5
	diskPresent   = 1
	diskStampTag  = 0xd15c000000000000
)

// diskMaxCount is the most blocks one request may move: the buffer area.
const diskMaxCount = diskBufSize / DiskBlockSize

// mix64 is abi.h's mix64 (the murmur3 finalizer).
func mix64(x uint64) uint64 {
	x ^= x >> 33
	x *= 0xff51afd7ed558ccd
	x ^= x >> 33
	x *= 0xc4ceb9fe1a85ec53
	x ^= x >> 33
	return x
}

// stampWord0 is word 0 of a dirty-workload page: the vCPU and the page index.
func stampWord0(vcpu int, index uint64) uint64 { return uint64(vcpu)<<56 | index }

// fillBase is abi.h's fill_base.
func fillBase(w0, version uint64) uint64 { return mix64(w0 ^ version*fillK) }

// xorshift64 is abi.h's xorshift64: the text content's word stream.
func xorshift64(x uint64) uint64 {
	x ^= x << 13
	x ^= x >> 7
	x ^= x << 17
	return x
}

// textWord is abi.h's text_word: the eight-byte word state x picks.
func textWord(x uint64) uint64 {
	t := x >> 60
	n := 2 + t%6
	var w uint64
	for j := uint64(0); j < 8; j++ {
		c := uint64(' ')
		if j < n {
			c = 'a' + (t*7+j*3)%26
		}
		w |= c << (8 * j)
	}
	return w
}

// CounterStep is one step of the counter workload's running hash:
// h_c = CounterStep(h_{c-1}, c), starting from CounterStart.
func CounterStep(h, c uint64) uint64 {
	h = h<<5 | h>>59
	h ^= c
	return h * counterK
}

// CounterStart is the counter workload's hash before its first step.
const CounterStart uint64 = counterH0

// CounterHash returns the running hash at count to, given its value h at count
// from (from <= to).
func CounterHash(h, from, to uint64) uint64 {
	for c := from + 1; c <= to; c++ {
		h = CounterStep(h, c)
	}
	return h
}
