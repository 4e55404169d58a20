// Package netlab builds the network a replicated test VM's output is
// measured in, for one run, and removes it after: two namespaces, a bridge,
// the guest's tap and a client (Lab), and a UDP client that sends the
// guest's udp-echo numbered requests at a steady rate and times the answers
// (EchoClient). The main job and the bench use it; it needs root
// (CAP_NET_ADMIN) and iproute2.
package netlab
