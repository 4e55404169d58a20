package history

import (
	"encoding/binary"
	"fmt"
	"os"
	"slices"

	bolt "go.etcd.io/bbolt"
)

// GCStats says what a collection did.
type GCStats struct {
	Points     int   // points whose trees were marked
	Live       int   // blobs still referenced
	Dropped    int   // index entries of blobs no point references
	Rewritten  int   // packs whose live blobs were copied to a new pack
	Removed    int   // pack files removed
	Reclaimed  int64 // bytes of pack files removed, less the bytes copied
	PackBytes  int64 // the packs' size afterwards
	IndexBytes int64 // the index's size afterwards
}

// GC reclaims what no point references. It marks every point's tree
// without holding up Add (blobs an Add uses meanwhile count as live),
// then, holding Add, drops the index entries of the dead blobs and
// rewrites each pack that is less than half live (Add waits for the
// copying; moving it out of the lock is still to do): its live blobs are
// copied to the current pack, synced, the index moved to them in one
// transaction, and only then is the old pack removed. A crash at any step
// leaves every point whole: until that transaction commits, the index
// names only the old copies.
func (s *Store) GC() (GCStats, error) {
	s.gcmu.Lock()
	defer s.gcmu.Unlock()
	var st GCStats

	s.mu.Lock()
	s.touched = map[Hash]struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.touched = nil
		s.mu.Unlock()
	}()

	live := map[Hash]struct{}{}
	pts, err := s.Points()
	if err != nil {
		return st, fmt.Errorf("history: gc: the index is damaged, nothing collected: %w", err)
	}
	tx, err := s.db.Begin(false)
	if err != nil {
		return st, fmt.Errorf("history: gc: %w", err)
	}
	r := &reader{s: s, tx: tx}
	mark := func(h Hash) error { live[h] = struct{}{}; return nil }
	for _, p := range pts {
		live[p.State] = struct{}{}
		for _, t := range []struct {
			root   Hash
			leaves int64
		}{{p.Mem, int64(p.MemSize / leafSize)}, {p.Disk, (p.DiskSize + leafSize - 1) / leafSize}} {
			if t.leaves == 0 {
				continue
			}
			get := func(h Hash, dst []byte) error {
				live[h] = struct{}{}
				return r.get(h, dst)
			}
			if err := walk(t.root, t.leaves, get, func(_ int64, h Hash) error { return mark(h) }); err != nil {
				tx.Rollback()
				return st, fmt.Errorf("history: gc: point %d (epoch %d) is damaged, nothing collected: %w", p.ID, p.Epoch, err)
			}
		}
		st.Points++
	}
	tx.Rollback()

	s.mu.Lock()
	defer s.mu.Unlock()
	for h := range s.touched {
		live[h] = struct{}{}
	}
	st.Live = len(live)

	// Sweep: dead entries go; count each pack's live bytes.
	type packUse struct{ size, live int64 }
	use := map[uint32]*packUse{}
	var moves []Hash
	err = s.db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketPacks).ForEach(func(k, v []byte) error {
			if val, err := unseal("packs", k, v, 8); err == nil {
				use[binary.BigEndian.Uint32(k)] = &packUse{size: int64(binary.LittleEndian.Uint64(val))}
			}
			return nil
		}); err != nil {
			return err
		}
		blobs := tx.Bucket(bucketBlobs)
		var dead [][]byte
		err := blobs.ForEach(func(k, v []byte) error {
			h := Hash(k)
			if _, ok := live[h]; !ok {
				dead = append(dead, slices.Clone(k))
				return nil
			}
			if val, err := unseal("blobs", k, v, locSize); err == nil {
				l := getLoc(val)
				if u := use[l.pack]; u != nil {
					u.live += l.size()
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
		for _, k := range dead {
			if err := blobs.Delete(k); err != nil {
				return err
			}
		}
		st.Dropped = len(dead)
		return nil
	})
	if err != nil {
		return st, fmt.Errorf("history: gc: %w", err)
	}

	// Rewrite the packs less than half live (never the one being written).
	var old []uint32
	for id, u := range use {
		if s.cur != nil && id == s.cur.id {
			continue
		}
		if u.live*2 < u.size || u.live == 0 {
			old = append(old, id)
		}
	}
	slices.Sort(old)
	if len(old) > 0 {
		if err := s.openPack(); err != nil {
			return st, err
		}
		oldSet := map[uint32]bool{}
		for _, id := range old {
			oldSet[id] = true
		}
		moved := map[Hash]loc{}
		var copied int64
		rtx, err := s.db.Begin(false)
		if err != nil {
			return st, fmt.Errorf("history: gc: %w", err)
		}
		rd := &reader{s: s, tx: rtx}
		err = rtx.Bucket(bucketBlobs).ForEach(func(k, v []byte) error {
			val, err := unseal("blobs", k, v, locSize)
			if err != nil {
				return nil // reported where it is read
			}
			l := getLoc(val)
			if !oldSet[l.pack] {
				return nil
			}
			h := Hash(k)
			buf := make([]byte, l.raw)
			if err := rd.get(h, buf); err != nil {
				return err
			}
			nl, err := s.cur.append(h, buf)
			if err != nil {
				return err
			}
			moved[h] = nl
			copied += nl.size()
			moves = append(moves, h)
			return nil
		})
		rtx.Rollback()
		if err != nil {
			return st, fmt.Errorf("history: gc: rewrite packs %v: %w (they stay as they are)", old, err)
		}
		if err := s.cur.sync(); err != nil {
			return st, err
		}
		err = s.db.Update(func(tx *bolt.Tx) error {
			blobs := tx.Bucket(bucketBlobs)
			v := make([]byte, locSize)
			for h, l := range moved {
				l.put(v)
				if err := blobs.Put(h[:], sealed(h[:], slices.Clone(v))); err != nil {
					return err
				}
			}
			packs := tx.Bucket(bucketPacks)
			k := u32key(s.cur.id)
			if err := packs.Put(k, sealed(k, binary.LittleEndian.AppendUint64(nil, uint64(s.cur.size)))); err != nil {
				return err
			}
			for _, id := range old {
				if err := packs.Delete(u32key(id)); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return st, fmt.Errorf("history: gc: %w", err)
		}
		st.Rewritten = len(old)
		for _, id := range old {
			s.rmu.Lock()
			if f := s.packs[id]; f != nil {
				f.Close()
				delete(s.packs, id)
			}
			s.rmu.Unlock()
			if err := os.Remove(packPath(s.dir, id)); err == nil {
				st.Removed++
				st.Reclaimed += use[id].size
			}
		}
		st.Reclaimed -= copied
	}
	st.PackBytes, st.IndexBytes = s.sizes()
	return st, nil
}

// sizes returns the bytes in packs and in the index.
func (s *Store) sizes() (packs, index int64) {
	ents, _ := os.ReadDir(s.dir)
	for _, e := range ents {
		if fi, err := e.Info(); err == nil {
			if e.Name() == "index.db" {
				index = fi.Size()
			} else {
				packs += fi.Size()
			}
		}
	}
	return packs, index
}

// Size is the store's size on disk: packs and index.
func (s *Store) Size() int64 {
	p, i := s.sizes()
	return p + i
}
