package replicate

import "testing"

// The backup's receiver takes each message only in the states wire.go's
// table lists, and refuses any other naming the message and the state.
func TestRecvStates(t *testing.T) {
	all := []MsgType{MsgHello, MsgWelcome, MsgReject, MsgPages, MsgState, MsgEnd, MsgAck, MsgHeartbeat, MsgBye,
		MsgStreamReply, MsgStreamSync, MsgStreamEpoch}
	legal := map[recvState][]MsgType{
		awaitHello: {MsgHello},
		syncRound:  {MsgPages, MsgStreamSync, MsgEnd, MsgHeartbeat, MsgBye, MsgReject},
		ckptData:   {MsgPages, MsgStreamSync, MsgStreamEpoch, MsgState, MsgEnd, MsgHeartbeat, MsgBye, MsgReject},
		ckptState:  {MsgPages, MsgEnd, MsgHeartbeat, MsgReject},
		closed:     nil,
	}
	for st, want := range legal {
		for _, m := range all {
			ok := false
			for _, w := range want {
				ok = ok || w == m
			}
			if st.accepts(m) != ok {
				t.Errorf("%v accepts %v: %v, want %v", st, m, st.accepts(m), ok)
			}
		}
		if st.accepts(msgTypes) || st.accepts(0) {
			t.Errorf("%v accepts an invalid type", st)
		}
	}

	tests := []struct {
		name    string
		st      recvState
		pages   uint64
		h       Header
		wantErr string
		wantSt  recvState // after admit
	}{
		{"an ack from the primary", syncRound, 0, Header{Type: MsgAck}, "primary sent ack in the middle of the stream (sync-round)", syncRound},
		{"a second hello", ckptData, 0, Header{Type: MsgHello, Epoch: 2}, "primary sent hello in the middle of the stream (checkpoint-data)", ckptData},
		{"a second state", ckptState, 0, Header{Type: MsgState, Epoch: 2}, "unexpected state message in epoch 2 (checkpoint-state)", ckptState},
		{"a state in the sync", syncRound, 0, Header{Type: MsgState}, "unexpected state message in epoch 0 (sync-round)", syncRound},
		{"bye after the state", ckptState, 0, Header{Type: MsgBye, Epoch: 1}, "bye at epoch 1 while epoch 2 is in progress (checkpoint-state)", ckptState},
		{"bye inside a round", syncRound, 3, Header{Type: MsgBye}, "bye at epoch 0 while epoch 0 is in progress (sync-round)", syncRound},
		{"a message of another epoch", ckptData, 0, Header{Type: MsgPages, Epoch: 3}, "pages message of epoch 3 while epoch 2 is in progress", ckptData},
		{"the sync ends at checkpoint 1's first message", syncRound, 0, Header{Type: MsgPages, Epoch: 1}, "", ckptData},
		{"not inside a round", syncRound, 5, Header{Type: MsgPages, Epoch: 1}, "pages message of epoch 1 while epoch 0 is in progress", syncRound},
		{"closed takes nothing", closed, 0, Header{Type: MsgHeartbeat}, "primary sent heartbeat in the middle of the stream (closed)", closed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := testSession(t, 8)
			s.st, s.pages = tt.st, tt.pages
			if tt.st == syncRound || tt.st == closed {
				s.epoch = 1
			}
			err := s.admit(tt.h)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
			} else {
				checkProto(t, err, tt.wantErr)
			}
			if s.st != tt.wantSt {
				t.Errorf("state %v after admit, want %v", s.st, tt.wantSt)
			}
		})
	}
}
