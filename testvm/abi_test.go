package testvm

import (
	"bufio"
	"os"
	"strconv"
	"strings"
	"testing"
)

// TestABIMatchesHeader parses every #define in guest/abi.h and checks it
// against the Go constant of the same meaning, so the VMM and the guest cannot
// drift apart.
func TestABIMatchesHeader(t *testing.T) {
	want := map[string]uint64{
		"ABI_VERSION": abiVersion, "PAGE_SIZE": pageSize, "MAX_VCPUS": MaxVCPUs,
		"GDT_ADDR": gdtAddr, "TSS_ADDR": tssAddr, "PARAMS_ADDR": paramsAddr, "STATUS_ADDR": statusAddr,
		"STATUS_STRIDE": statusStride, "PT_ADDR": ptAddr, "CODE_ADDR": codeAddr, "CODE_MAX": codeMax,
		"STACK_ADDR": stackAddr, "STACK_SIZE": stackSize, "DATA_ADDR": DataAddr,
		"NET_ADDR": netAddr, "NET_TX_ADDR": netTxAddr, "NET_RX_ADDR": netRxAddr, "PORT_NET_KICK": portNetKick,
		"PORT_CONSOLE": portConsole, "PORT_CONTROL": portControl,
		"CONSOLE_OFFSET": consoleOffset, "CONSOLE_MAX": consoleMax,
		"CTRL_READY": ctrlReady, "CTRL_DONE": ctrlDone, "CTRL_ERROR": ctrlError,
		"GERR_BAD_PARAMS": gerrBadParams, "GERR_BAD_WORKLOAD": gerrBadWorkload, "GERR_BAD_PATTERN": gerrBadPattern,
		"GERR_BAD_REGION": gerrBadRegion, "GERR_BAD_VCPU": gerrBadVCPU, "GERR_BAD_NET": gerrBadNet,
		"PARAMS_MAGIC": paramsMagic, "STATUS_MAGIC": statusMagic,
		"WL_IDLE": wlIdle, "WL_DIRTY": wlDirty, "WL_COUNTER": wlCounter, "WL_UDP_ECHO": wlUDPEcho, "WL_UDP_STREAM": wlUDPStrm,
		"PAT_SEQ": patSeq, "PAT_RANDOM": patRandom, "PAT_HOTCOLD": patHotcold,
		"CONTENT_STAMP": contentStamp, "CONTENT_TEXT": contentText, "CONTENT_SPARSE": contentSparse, "TEXT_WORDS": textWords,
		"GS_BOOT": gsBoot, "GS_RUNNING": gsRunning, "GS_WAITING": gsWaiting, "GS_ERROR": gsError,
		"FILL_K": fillK, "COUNTER_K": counterK, "COUNTER_H0": counterH0,
		"P_MAGIC": pMagic, "P_ABI_VERSION": pABIVersion, "P_NR_VCPUS": pNrVCPUs, "P_WORKLOAD": pWorkload,
		"P_PATTERN": pPattern, "P_TSC_KHZ": pTSCKHz, "P_RATE": pRate, "P_SEED": pSeed, "P_PHASE_OPS": pPhaseOps,
		"P_HOT_PCT": pHotPct, "P_HOT_WRITE_PCT": pHotWritePct, "P_GO": pGo, "P_IDLE_TICK_US": pIdleTickUs,
		"P_VCPU": pVCPU, "P_VCPU_STRIDE": pVCPUStride, "PV_BASE": pvBase, "PV_PAGES": pvPages,
		"PV_WORKING_SET": pvWorkingSet, "P_NET_MAC": pNetMAC, "P_NET_IP": pNetIP, "P_NET_PORT": pNetPort,
		"P_STREAM_RATE": pStreamRate, "P_STREAM_BYTES": pStreamBytes, "P_NET_FLAGS": pNetFlags, "P_NET_SERVICE": pNetService, "P_CONTENT": pContent,
		"S_MAGIC": sMagic, "S_STATE": sState, "S_ERROR": sError, "S_ITERATIONS": sIterations,
		"S_WRITES": sWrites, "S_PHASE": sPhase, "S_CUR_PAGE": sCurPage, "S_COUNTER_SEQ": sCounterSeq,
		"S_COUNTER_SLOT": sCounterSlot, "S_TSC": sTSC, "S_NET_RX": sNetRx, "S_NET_TX": sNetTx,
		"S_NET_SEQ": sNetSeq, "S_NET_IGNORED": sNetIgnored, "S_NET_PEER_IP": sNetPeerIP, "S_NET_PEER_PORT": sNetPeerPort,
		"NET_SLOTS": netSlots, "NET_SLOT_SIZE": netSlotSize, "NET_SLOT_DATA": netSlotData, "NET_FRAME_MAX": NetFrameMax,
		"N_TX_PROD": nTxProd, "N_TX_CONS": nTxCons, "N_TX_KICK": nTxKick, "N_RX_PROD": nRxProd, "N_RX_CONS": nRxCons,
		"NET_PRESENT": netPresent,
		"DISK_ADDR":   diskAddr, "DISK_RING_ADDR": diskRingAddr, "DISK_BUF_ADDR": diskBufAddr, "DISK_BUF_SIZE": diskBufSize,
		"PORT_DISK_KICK": portDiskKick, "GERR_BAD_DISK": gerrBadDisk, "GERR_DISK_IO": gerrDiskIO, "GERR_DISK_VERIFY": gerrDiskVerify,
		"WL_DISK": wlDisk, "P_DISK_BLOCKS": pDiskBlocks, "P_DISK_WS": pDiskWS, "P_DISK_FLUSH_EVERY": pDiskFlush, "P_DISK_FLAGS": pDiskFlags,
		"S_DISK_WRITES": sDiskWrites, "S_DISK_READS": sDiskReads, "S_DISK_FLUSHES": sDiskFlushes, "S_DISK_ERRORS": sDiskErrors,
		"S_DISK_BATCH": sDiskBatch, "S_DISK_BATCH_N": sDiskBatchN, "S_DISK_BAD_BLOCK": sDiskBadBlk, "S_DISK_BAD_STATUS": sDiskBadStat,
		"DISK_SLOTS": diskSlots, "DISK_DESC_SIZE": diskDescSize, "DISK_BLOCK_SIZE": DiskBlockSize,
		"DK_REQ_PROD": dkReqProd, "DK_REQ_CONS": dkReqCons, "DK_KICK": dkKick,
		"D_OP": dOp, "D_FLAGS": dFlags, "D_BLOCK": dBlock, "D_COUNT": dCount, "D_STATUS": dStatus, "D_BUF": dBuf,
		"DISK_OP_READ": diskOpRead, "DISK_OP_WRITE": diskOpWrite, "DISK_OP_FLUSH": diskOpFlush, "DISK_F_FUA": diskFFUA,
		"DISK_S_OK": diskSOK, "DISK_S_BAD_OP": diskSBadOp, "DISK_S_BAD_RANGE": diskSBadRange, "DISK_S_BAD_BUF": diskSBadBuf,
		"DISK_S_IO_ERROR": diskSIOError, "DISK_PRESENT": diskPresent, "DISK_STAMP_TAG": diskStampTag,
	}
	f, err := os.Open("guest/abi.h")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	seen := map[string]bool{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) != 3 || fields[0] != "#define" || strings.HasSuffix(fields[1], "_H") {
			continue
		}
		name := fields[1]
		v, err := strconv.ParseUint(fields[2], 0, 64)
		if err != nil {
			t.Errorf("abi.h: %s = %q is not a plain integer", name, fields[2])
			continue
		}
		w, ok := want[name]
		if !ok {
			t.Errorf("abi.h defines %s, which has no Go counterpart in abi.go", name)
			continue
		}
		seen[name] = true
		if v != w {
			t.Errorf("abi.h %s = %#x, Go has %#x", name, v, w)
		}
	}
	for name := range want {
		if !seen[name] {
			t.Errorf("Go expects %s in abi.h; it is not defined there", name)
		}
	}
}

// The counter hash has a fixed first few values; the guest computes the same
// (checked end to end by the counter tests).
func TestCounterHash(t *testing.T) {
	h := CounterStart
	for c := uint64(1); c <= 1000; c++ {
		h = CounterStep(h, c)
	}
	if got := CounterHash(CounterStart, 0, 1000); got != h {
		t.Fatalf("CounterHash(0..1000) = %#x, stepping gives %#x", got, h)
	}
	if got := CounterHash(CounterHash(CounterStart, 0, 400), 400, 1000); got != h {
		t.Fatalf("CounterHash in two legs = %#x, want %#x", got, h)
	}
}
