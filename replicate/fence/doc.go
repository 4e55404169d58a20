// Package fence decides which agent owns a protected VM, through a lease in
// etcd, so that a primary and a backup cut off from each other never both
// run it.
//
// # The owner key
//
// Each VM has one owner key, /repagent/vm/<Name>/owner, whose value is the
// owning agent's ID (such as host:pid). The key is attached to an etcd lease
// of the owner's, so it disappears by itself when the owner stops renewing:
// etcd, a trusted coordination service, is the only judge of who owns the
// VM. Both sides write it with one transaction that succeeds only if the key
// is absent (its CreateRevision is 0), so there is at most one owner at any
// revision. The revision at which the key was created (Owner.Revision) is a
// fencing token: it grows with every change of owner.
//
//	primary                      etcd                       backup
//	   |--- Grant(TTL) ----------->|                           |
//	   |--- Txn(absent? put) ----->| key = primary             |
//	   |--- KeepAliveOnce ........>| every TTL/3               |
//	   |                           |<------ Get / Watch -------| TakeOver waits
//	   X  (primary cut off: renewals stop)                     |
//	   |  validUntil passes: Lost closes, primary fences itself|
//	   |                           | lease expires, key deleted|
//	   |                           |------- delete event ----->|
//	   |                           |<-- Grant, Txn(absent?) ---| backup owns it
//
// # Knowing the lease is valid
//
// The owner never trusts etcd's clock, only its own. Before each renewal it
// notes the time it sends the request; when the response grants TTL seconds
// the lease cannot expire on the server before send time + TTL (the server
// restarts the TTL when it receives the request, which is later). The owner
// therefore treats the lease as valid until send time + TTL - Margin, the
// margin covering clock rate differences and the time the embedder needs to
// act on Lost. Using the response's arrival time instead would overestimate
// validity by the round trip. (A new etcd leader extends every lease on
// election, which only moves the server's expiry later: the safe side.) The
// TTL used is the one the server grants, which may be more than asked: etcd
// raises TTLs below 1.5 election timeouts (2s with its defaults).
//
// Renewals are single KeepAliveOnce calls every TTL/3, each with a timeout
// of TTL/3, rather than the client library's KeepAlive stream whose timing
// cannot be bounded: a hung or unreachable etcd makes renewals fail and
// validity lapse on time. A timer closes Lost at validUntil unless a
// renewal moved it on.
//
// When validity lapses, Lost closes and Valid is false for good. The owner
// does not revoke the lease then: the server keeps the key until its own
// expiry, at least Margin later, which is the time the old owner has to
// fence itself before a backup can win the key.
//
// # The standby record
//
// Owning the VM is not enough for a backup to resume it: its replica must
// hold what the world saw. A second key, /repagent/vm/<Name>/standby
// (StandbyKey), names the backup session that holds the VM's state, or
// NoStandby. The owner writes it with SetStandby, in a transaction that
// succeeds only while its own owner key stands, so every record is written
// before any later owner can win the key: the primary records a session's
// backup before it first releases that session's output, and records
// NoStandby before it releases output its lost backup did not acknowledge.
// Claim, the backup's failover step, takes the key over, reads the record,
// and resumes only the session it names (else a *StaleError, and the key is
// released), then records NoStandby: the resumed VM has no backup.
//
// # What the embedder must do
//
//  1. Make a clientv3.Client and a Config naming the VM and this agent.
//  2. The primary calls Acquire at start; a *HeldError means another agent
//     owns the VM: do not run it.
//  3. While it runs, the primary checks Valid before each externally visible
//     step (releasing held output, acknowledging a disk commit), and fences
//     itself (stops releasing output, pauses the VM, stops the disk) as soon
//     as Lost is closed.
//  4. The primary calls SetStandby as the standby record section says.
//  5. The backup, on losing the primary, calls Claim with its replica's
//     session and resumes the VM only once it returns an Owner, then
//     behaves as a primary (3).
//  6. On a planned stop or handover, the owner calls Release after it has
//     stopped releasing output: Lost closes and the key is free at once.
package fence
