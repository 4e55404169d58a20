package history

import (
	"bytes"
	"fmt"
)

// A point's memory (and its disk) is a tree of hashes: the leaves are the
// hashes of its pages (blocks), in order; a node is the concatenation of
// fanout child hashes (the last node of a level padded with zero hashes),
// stored as a blob like a page; the root names the whole. A node whose
// children are all zero is the zero hash and is not stored, so a zero
// region costs nothing at any level. Two points that share a region share
// its subtree, node and pages: a point costs its changed pages and the
// nodes above them, about 2 KiB per 64 pages changed at worst, and
// restoring one reads its own nodes and pages, nothing of any other point.
const (
	fanout   = 64
	nodeSize = fanout * len(Hash{})
	leafSize = 4096
)

// tree is a point's tree held in memory for the next point: every level's
// hashes, leaves first, up to the root.
type tree struct {
	leaves int64 // leaf count
	levels [][]Hash
}

func newTree(leaves int64) *tree {
	t := &tree{leaves: leaves}
	n := leaves
	for {
		t.levels = append(t.levels, make([]Hash, n))
		if n <= 1 {
			break
		}
		n = (n + fanout - 1) / fanout
	}
	return t
}

// height is the number of node levels above the leaves.
func height(leaves int64) int {
	h := 0
	for n := leaves; n > 1; n = (n + fanout - 1) / fanout {
		h++
	}
	return h
}

func (t *tree) root() Hash { return t.levels[len(t.levels)-1][0] }

// node returns the content of node i of level lv (≥ 1): its children's
// hashes at level lv-1.
func (t *tree) node(lv int, i int64, buf []byte) []byte {
	buf = buf[:nodeSize]
	clear(buf)
	kids := t.levels[lv-1]
	for k := int64(0); k < fanout && i*fanout+k < int64(len(kids)); k++ {
		copy(buf[k*32:], kids[i*fanout+k][:])
	}
	return buf
}

// rehash recomputes the nodes above the changed leaves (all of them when
// changed is nil) and hands each new non-zero node to put.
func (t *tree) rehash(changed []int64, put func(Hash, []byte) error) error {
	buf := make([]byte, nodeSize)
	dirty := changed
	all := changed == nil
	for lv := 1; lv < len(t.levels); lv++ {
		var next []int64
		update := func(i int64) error {
			b := t.node(lv, i, buf)
			h := zeroHash
			if !allZero(b) {
				h = hashOf(b)
				if h != t.levels[lv][i] {
					if err := put(h, b); err != nil {
						return err
					}
				}
			}
			t.levels[lv][i] = h
			return nil
		}
		if all {
			for i := range int64(len(t.levels[lv])) {
				if err := update(i); err != nil {
					return err
				}
			}
			continue
		}
		last := int64(-1)
		for _, c := range dirty {
			i := c / fanout
			if i == last {
				continue
			}
			last = i
			if err := update(i); err != nil {
				return err
			}
			next = append(next, i)
		}
		dirty = next
	}
	return nil
}

// zeros is a zero leaf (and, by its first nodeSize bytes, a zero node).
var zeros [max(leafSize, nodeSize)]byte

// allZero reports whether b, at most a leaf long, is all zero: one
// vectorised compare, since it runs on every page a point hashes.
func allZero(b []byte) bool { return bytes.Equal(b, zeros[:len(b)]) }

// walk visits every non-zero leaf of the tree rooted at root, with leaves
// leaves: it reads each node with get and calls leaf with the leaf's index
// and hash. The work is the tree's own nodes and leaves.
func walk(root Hash, leaves int64, get func(Hash, []byte) error, leaf func(i int64, h Hash) error) error {
	if root == zeroHash {
		return nil
	}
	h := height(leaves)
	if h == 0 {
		return leaf(0, root)
	}
	bufs := make([][]byte, h+1)
	for i := range bufs {
		bufs[i] = make([]byte, nodeSize)
	}
	// span is the number of leaves under one node of level lv.
	span := func(lv int) int64 {
		s := int64(1)
		for range lv {
			s *= fanout
		}
		return s
	}
	var visit func(lv int, node Hash, first int64) error
	visit = func(lv int, node Hash, first int64) error {
		b := bufs[lv]
		if err := get(node, b); err != nil {
			return err
		}
		sub := span(lv - 1)
		for k := int64(0); k < fanout; k++ {
			c := Hash(b[k*32 : k*32+32])
			if c == zeroHash {
				continue
			}
			at := first + k*sub
			if at >= leaves {
				return fmt.Errorf("%w: tree node %s names a child past the end", ErrCorrupt, node)
			}
			var err error
			if lv == 1 {
				err = leaf(at, c)
			} else {
				err = visit(lv-1, c, at)
			}
			if err != nil {
				return err
			}
		}
		return nil
	}
	return visit(h, root, 0)
}
