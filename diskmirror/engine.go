package diskmirror

import (
	"bytes"
	"errors"
	"fmt"
	"io"

	"github.com/repagent/repagent/replicate"
)

// Source is a Mirror as the replication engine's device stream
// (replicate.Config.Stream): the engine syncs the image to the backup's
// (hash lists, so blocks the backup holds are not sent), ships each epoch's
// writes inside the epoch and releases them on its ack. It implements
// replicate.Stream.
type Source struct {
	m      *Mirror
	block  int
	cfg    SyncConfig
	remote []Hash // the backup image's hashes, from Attach
}

// SourceConfig configures a Source.
type SourceConfig struct {
	// Block is the sync's block size: a power of two from MinBlockSize to
	// MaxBlockSize; 0 means DefaultBlockSize.
	Block int
	// Sync tunes the sync's rounds; its Batch must be at most MaxSyncBatch
	// (a sync stream travels as one message).
	Sync SyncConfig
}

// MaxSyncBatch is the most block data in one sync stream the engine carries:
// with its records' headers, a stream of it fits replicate.MaxStreamMessage.
const MaxSyncBatch = replicate.MaxStreamMessage / 2

// NewSource returns m as a device stream for the engine.
func NewSource(m *Mirror, cfg SourceConfig) (*Source, error) {
	if cfg.Block == 0 {
		cfg.Block = DefaultBlockSize
	}
	if err := checkBlockSize(int64(cfg.Block)); err != nil {
		return nil, fmt.Errorf("disk sync: %w", err)
	}
	if HashListSize(m.Size(), cfg.Block) < 0 {
		return nil, fmt.Errorf("disk of %d bytes has more than %d blocks of %d bytes: use larger blocks", m.Size(), MaxBlocks, cfg.Block)
	}
	if cfg.Sync.Batch == 0 {
		cfg.Sync.Batch = MaxSyncBatch
	}
	if cfg.Sync.Batch < 0 || cfg.Sync.Batch > MaxSyncBatch {
		return nil, fmt.Errorf("disk sync batch of %d bytes: want 1 to %d", cfg.Sync.Batch, MaxSyncBatch)
	}
	return &Source{m: m, block: cfg.Block, cfg: cfg.Sync}, nil
}

// Mirror is the Mirror the Source streams.
func (s *Source) Mirror() *Mirror { return s.m }

// Info is the image's size and the sync's block size.
func (s *Source) Info() replicate.StreamInfo {
	return replicate.StreamInfo{Size: s.m.Size(), Block: uint32(s.block)}
}

// ReplySize is the length of the backup image's hash list.
func (s *Source) ReplySize() int64 { return HashListSize(s.m.Size(), s.block) }

// Attach takes the backup image's hash list.
func (s *Source) Attach(reply []byte) error {
	hs, block, err := DecodeHashes(bytes.NewReader(reply), s.m.Size())
	if err == nil && block != s.block {
		err = fmt.Errorf("blocks of %d bytes, asked for %d", block, s.block)
	}
	if err != nil {
		return fmt.Errorf("disk hash list: %w", err)
	}
	s.remote = hs
	return nil
}

// Sync runs a phase of the disk sync: Precopy, CatchUp or SendResidual.
func (s *Source) Sync(phase replicate.SyncPhase, send func([]byte) error) (replicate.StreamSync, error) {
	var st SyncStats
	var err error
	switch phase {
	case replicate.SyncPrecopy:
		if s.remote == nil {
			return replicate.StreamSync{}, errors.New("disk precopy before the backup's hash list")
		}
		st, err = s.m.Precopy(s.remote, s.block, s.cfg, send)
		s.remote = nil
	case replicate.SyncCatchUp:
		st, err = s.m.CatchUp(s.block, s.cfg, send)
	case replicate.SyncResidual:
		st, err = s.m.SendResidual(s.cfg.Batch, send)
	default:
		return replicate.StreamSync{}, fmt.Errorf("disk sync: unknown phase %v", phase)
	}
	return replicate.StreamSync{Units: st.Blocks, Unchanged: st.Identical, Rounds: st.Rounds, Sent: st.Sent,
		Bytes: st.Bytes, Encoded: st.Encoded, Messages: st.Streams, Left: st.Residual}, err
}

// Epoch returns closed epoch n's stream of write records.
func (s *Source) Epoch(n uint64) (io.Reader, replicate.StreamEpoch, error) {
	r, sum, err := s.m.Epoch(n)
	return r, replicate.StreamEpoch{Records: sum.Writes, Bytes: sum.Bytes, Encoded: sum.Encoded}, err
}

// Open, Commit, Discard and Release are the Mirror's (an OutputGate).
func (s *Source) Open(n uint64) error    { return s.m.Open(n) }
func (s *Source) Commit(n uint64) error  { return s.m.Commit(n) }
func (s *Source) Discard(n uint64) error { return s.m.Discard(n) }
func (s *Source) Release() error         { return s.m.Release() }

// NewSink returns the engine's maker of backup sinks
// (replicate.BackupConfig.NewSink) over the backup image img: for each
// session it makes a Replica of the size the primary declares (another
// size is refused, nothing written), hashes the image for the sync, and
// applies the sync and every committed epoch to it. cfg.FirstEpoch is the
// engine's (2: the first checkpoint carries the sync's residual).
func NewSink(img Disk, cfg ReplicaConfig) replicate.NewSink {
	return func(in replicate.StreamInfo) (replicate.Sink, error) {
		if HashListSize(in.Size, int(in.Block)) < 0 {
			return nil, fmt.Errorf("disk of %d bytes in %d-byte sync blocks: want blocks of a power of two from %d to %d, at most %d of them",
				in.Size, in.Block, MinBlockSize, MaxBlockSize, MaxBlocks)
		}
		c := cfg
		c.FirstEpoch = 2
		r, err := NewReplica(img, in.Size, c)
		if err != nil {
			return nil, fmt.Errorf("disk: %w", err)
		}
		return &sink{r: r, block: int(in.Block)}, nil
	}
}

// sink is a Replica as a replicate.Sink.
type sink struct {
	r     *Replica
	block int
}

// protoErr makes an error of data the primary sent a protocol error for the
// engine; other errors (the image's I/O) stay as they are.
func protoErr(err error) error {
	if errors.Is(err, ErrFormat) {
		return fmt.Errorf("%w: disk: %w", replicate.ErrProtocol, err)
	}
	return err
}

func (s *sink) Reply() ([]byte, error) {
	hs, err := s.r.Hashes(s.block)
	if err != nil {
		return nil, fmt.Errorf("hash the backup disk image: %w", err)
	}
	var buf bytes.Buffer
	if err := EncodeHashes(&buf, hs, s.r.Size(), s.block); err != nil {
		return nil, fmt.Errorf("disk hash list: %w", err)
	}
	return buf.Bytes(), nil
}

func (s *sink) ApplySync(msg []byte) error {
	_, err := s.r.ApplySync(bytes.NewReader(msg))
	return protoErr(err)
}

func (s *sink) Receive(r io.Reader) (uint64, error) {
	sum, err := s.r.Receive(r)
	return sum.Epoch, protoErr(err)
}

func (s *sink) Commit(n uint64) error   { return s.r.Commit(n) }
func (s *sink) Failover(n uint64) error { return s.r.Failover(n) }
func (s *sink) Close() error            { return s.r.Close() }
