// Package replicatetest provides a replicating pair for tests, in the manner
// of net/http/httptest: a replicate.Primary and a replicate.Backup joined by
// a real loopback TCP connection, set up, run and torn down in the order the
// engine needs.
//
// NewPair makes the Primary from a replicate.Config and the Backup from a
// replicate.BackupConfig, starts the backup on one session
// (replicate.Backup.Handle on the connection it accepts) and the primary's
// Run on its end, and registers with t.Cleanup what ends them. The test
// brings its own VM, gates, Stream and NewSink: the package knows no VMM and
// no device. What the configs leave unset gets a test's default:
//
//   - BackupConfig.NewMemory: an unlinked file in the test's temp dir.
//   - BackupConfig.Resume: none wanted; it closes the replica and fails, so a
//     session that fails over reports an error from Handle.
//   - Config.Log and BackupConfig.Log: Logger(t), shown when the test fails
//     or with -v.
//
// A test then drives the pair: WaitAcked to let checkpoints accumulate,
// KillPrimary (the primary's host dies: its end of the link is cut),
// KillBackup (the backup's host dies) or Stop (the primary stops on purpose
// and says bye), and reads the outcome with PrimaryErr (what Run returned)
// and BackupResult (the Failover and error of Handle). Each waits at most
// Pair.Timeout and fails the test rather than hang.
//
// NewUnstartedPair makes the two without starting them, so that a test can
// set the Pair's fields (Proxy between the two, to delay, corrupt or cut
// what the primary sends; Link around the primary's end, a slow link say;
// Timeout) or attach to the engines before they run, and then calls Start.
//
// At cleanup the pair ends Run (and waits for it, within Timeout), then the
// backup's session and the proxy, then closes the backup. Cleanups run last
// registered first, so a VM the test built before the pair (vmtest.Boot
// closes its machine in a cleanup) is closed only after Run is over.
//
// A test of a failover:
//
//	func TestFailover(t *testing.T) {
//		vm := newMyVM(t) // the test's replicate.VM
//		resumed := make(chan uint64, 1)
//		p := replicatetest.NewPair(t, replicate.Config{VM: vm, Interval: 10 * time.Millisecond},
//			replicate.BackupConfig{Resume: func(cp *replicate.Checkpoint) error {
//				defer cp.Memory.Close()
//				resumed <- cp.Epoch
//				return nil
//			}})
//		p.WaitAcked(10)
//		p.KillPrimary()
//		if err := p.PrimaryErr(); !errors.Is(err, replicate.ErrBackupLost) {
//			t.Fatalf("primary: %v, want ErrBackupLost", err)
//		}
//		fo, err := p.BackupResult()
//		if err != nil || fo.Epoch < 10 {
//			t.Fatalf("failover %+v, %v; want one to epoch 10 or later", fo, err)
//		}
//	}
//
// A test that corrupts the stream starts the pair itself:
//
//	p := replicatetest.NewUnstartedPair(t, cfg, bcfg)
//	p.Proxy = func(from io.Reader, to io.Writer) {
//		// read what the primary sends, write what the backup gets
//	}
//	p.Start()
package replicatetest
