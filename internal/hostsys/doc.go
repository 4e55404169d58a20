// Package hostsys holds the few host system calls the engine (replicate)
// and the command need beyond package os, so that those packages stay free
// of x/sys/unix and unsafe: opening a tap, mapping a file shared, populating memory
// without writing it, finding a file's holes, a read(2) on a socket's
// descriptor, and the free memory.
package hostsys
