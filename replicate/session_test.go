package replicate

import (
	"errors"
	"testing"
)

// The primary's session takes each event only where session.go's table
// says, and the first reason to end it stands.
func TestPrimarySessionStates(t *testing.T) {
	legal := map[sessState]map[sessEvent]sessState{
		sessRunning:     {evAbort: sessStopping, evBye: sessStopping, evEnd: sessEnded},
		sessStopping:    {evEnd: sessEnded},
		sessEnded:       {evRelease: sessUnprotected},
		sessUnprotected: {},
	}
	for from, next := range legal {
		for ev := range sessEvents {
			s := newPrimarySession()
			s.st = from
			want, ok := next[ev]
			if !ok {
				want = from
			}
			if got := s.fire(ev, errors.New("x")); got != ok || s.state() != want {
				t.Errorf("%v in %v: taken %v, now %v; want taken %v, now %v", ev, from, got, s.state(), ok, want)
			}
		}
	}

	reason, lost := errors.New("audit mismatch"), errors.New("read from backup: EOF")
	tests := []struct {
		name      string
		events    []sessEvent
		errs      []error
		wantState sessState
		wantCause error // after the events
		wantAbort error
	}{
		{"the link fails", []sessEvent{evEnd, evRelease}, []error{lost, nil}, sessUnprotected, lost, nil},
		{"an abort's reason outlives the end", []sessEvent{evAbort, evEnd}, []error{reason, lost}, sessEnded, reason, reason},
		{"a second abort is ignored", []sessEvent{evAbort, evAbort, evEnd}, []error{reason, lost, lost}, sessEnded, reason, reason},
		{"an abort after the end is ignored", []sessEvent{evEnd, evAbort}, []error{lost, reason}, sessEnded, lost, nil},
		{"no abort after bye", []sessEvent{evBye, evAbort, evEnd}, []error{nil, reason, lost}, sessEnded, lost, nil},
		{"no release before the end", []sessEvent{evAbort, evRelease}, []error{reason, nil}, sessStopping, nil, reason},
		{"the first end stands", []sessEvent{evEnd, evEnd}, []error{lost, reason}, sessEnded, lost, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newPrimarySession()
			for i, ev := range tt.events {
				s.fire(ev, tt.errs[i])
			}
			if s.state() != tt.wantState {
				t.Errorf("state %v, want %v", s.state(), tt.wantState)
			}
			if s.cause() != tt.wantCause || s.aborted() != tt.wantAbort {
				t.Errorf("cause %v, abort %v; want %v, %v", s.cause(), s.aborted(), tt.wantCause, tt.wantAbort)
			}
			if s.ended() != (tt.wantCause != nil) {
				t.Errorf("ended %v with cause %v", s.ended(), s.cause())
			}
		})
	}
}
