// Package etcdtest runs a real etcd server for tests, as its own process,
// and a TCP proxy that can cut one client off from it.
//
// Start runs Debian's /usr/bin/etcd (package etcd-server, installed by
// `make deps`) with its data in t.TempDir() and its client and peer URLs on
// free 127.0.0.1 ports, waits until it answers and kills it at cleanup. Tests
// that call Start are gated by privileged.Etcd: skipped without the binary,
// failed instead when REPAGENT_REQUIRE_PRIVILEGED=1.
//
// The server runs with a 10 ms heartbeat and a 100 ms election timeout, so
// its minimum lease TTL is 1 s (etcd raises any shorter TTL to 1.5 election
// timeouts, rounded up to seconds; with the defaults that is 2 s).
//
// NewProxy puts a Proxy between a client and the server: Cut holds every
// byte in both directions (a partition, or a hung server, as the client sees
// it) and Restore lets them flow again, without stopping the server.
package etcdtest
