// Command tiles_interop audits a C2SP tlog-tiles folder with golang.org/x/mod/sumdb/tlog, an
// implementation of transparency-log tiles that shares no code with trainguard.
//
//	tiles_interop DIR
//
// It reads DIR/checkpoint (origin, size, base64 root), then, through tlog.TileHashReader (which checks
// every tile it loads against the checkpoint's root):
//   - recomputes the root with tlog.TreeHash;
//   - checks that every entry in every entry bundle hashes (tlog.RecordHash) to the leaf hash the tiles hold;
//   - proves and checks the inclusion of every entry with tlog.ProveRecord and tlog.CheckRecord.
//
// It prints one "ok" line and exits 0, or prints what failed and exits 1.
package main

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/tlog"
)

const tileHeight = 8 // C2SP tlog-tiles fixes the height at 8, so its paths leave it out

// tilesDir is a tlog.TileReader over a tlog-tiles folder.
type tilesDir string

func (d tilesDir) Height() int { return tileHeight }

// c2spPath maps x/mod's "tile/8/L/N[.p/W]" and "tile/8/data/N[.p/W]" to C2SP's "tile/L/N[.p/W]" and
// "tile/entries/N[.p/W]": the index encoding of N is x/mod's own, so it checks trainguard's.
func c2spPath(t tlog.Tile) string {
	rest := strings.TrimPrefix(t.Path(), fmt.Sprintf("tile/%d/", tileHeight))
	if strings.HasPrefix(rest, "data/") {
		rest = "entries/" + strings.TrimPrefix(rest, "data/")
	}
	return "tile/" + rest
}

func (d tilesDir) ReadTiles(tiles []tlog.Tile) ([][]byte, error) {
	data := make([][]byte, len(tiles))
	for i, t := range tiles {
		b, err := os.ReadFile(filepath.Join(string(d), filepath.FromSlash(c2spPath(t))))
		if err != nil {
			return nil, err
		}
		if len(b) != t.W*tlog.HashSize {
			return nil, fmt.Errorf("%s is %d bytes, want %d", c2spPath(t), len(b), t.W*tlog.HashSize)
		}
		data[i] = b
	}
	return data, nil
}

func (d tilesDir) SaveTiles([]tlog.Tile, [][]byte) {}

func readCheckpoint(dir string) (tlog.Tree, string, error) {
	text, err := os.ReadFile(filepath.Join(dir, "checkpoint"))
	if err != nil {
		return tlog.Tree{}, "", err
	}
	lines := strings.SplitN(string(text), "\n", 4)
	if len(lines) < 4 {
		return tlog.Tree{}, "", fmt.Errorf("checkpoint has fewer than three lines")
	}
	size, err := strconv.ParseInt(lines[1], 10, 64)
	if err != nil || size < 0 {
		return tlog.Tree{}, "", fmt.Errorf("checkpoint size %q is not a number", lines[1])
	}
	root, err := base64.StdEncoding.DecodeString(lines[2])
	if err != nil || len(root) != tlog.HashSize {
		return tlog.Tree{}, "", fmt.Errorf("checkpoint root %q is not a base64 SHA-256 hash", lines[2])
	}
	var tree tlog.Tree
	tree.N = size
	copy(tree.Hash[:], root)
	return tree, lines[0], nil
}

// readEntries reads every entry bundle of a tree of size n, in order.
func readEntries(dir string, n int64) ([][]byte, error) {
	var entries [][]byte
	for start := int64(0); start < n; start += 1 << tileHeight {
		width := n - start
		if width > 1<<tileHeight {
			width = 1 << tileHeight
		}
		t := tlog.Tile{H: tileHeight, L: -1, N: start >> tileHeight, W: int(width)}
		b, err := os.ReadFile(filepath.Join(dir, filepath.FromSlash(c2spPath(t))))
		if err != nil {
			return nil, err
		}
		bundle, err := splitBundle(b)
		if err != nil {
			return nil, fmt.Errorf("%s: %v", c2spPath(t), err)
		}
		if int64(len(bundle)) != width {
			return nil, fmt.Errorf("%s holds %d entries, want %d", c2spPath(t), len(bundle), width)
		}
		entries = append(entries, bundle...)
	}
	return entries, nil
}

// splitBundle parses a bundle: each entry a big-endian uint16 length, then that many bytes.
func splitBundle(b []byte) ([][]byte, error) {
	var out [][]byte
	r := bytes.NewReader(b)
	for r.Len() > 0 {
		var length uint16
		if err := binary.Read(r, binary.BigEndian, &length); err != nil {
			return nil, fmt.Errorf("truncated length prefix")
		}
		if int(length) > r.Len() {
			return nil, fmt.Errorf("entry %d claims %d bytes, %d left", len(out), length, r.Len())
		}
		entry := make([]byte, length)
		_, _ = r.Read(entry)
		out = append(out, entry)
	}
	return out, nil
}

func check(dir string) (string, error) {
	tree, origin, err := readCheckpoint(dir)
	if err != nil {
		return "", err
	}
	if tree.N == 0 {
		return "", fmt.Errorf("empty tree: nothing to audit")
	}
	hr := tlog.TileHashReader(tree, tilesDir(dir))
	root, err := tlog.TreeHash(tree.N, hr)
	if err != nil {
		return "", fmt.Errorf("tree hash: %v", err)
	}
	if root != tree.Hash {
		return "", fmt.Errorf("tiles give root %v, checkpoint says %v", root, tree.Hash)
	}

	entries, err := readEntries(dir, tree.N)
	if err != nil {
		return "", err
	}
	leafIndexes := make([]int64, tree.N)
	for i := range leafIndexes {
		leafIndexes[i] = tlog.StoredHashIndex(0, int64(i))
	}
	leaves, err := hr.ReadHashes(leafIndexes)
	if err != nil {
		return "", fmt.Errorf("leaf hashes: %v", err)
	}
	for i, entry := range entries {
		if tlog.RecordHash(entry) != leaves[i] {
			return "", fmt.Errorf("entry %d does not hash to leaf %d of the tiles", i, i)
		}
	}

	// TileHashReader in x/mod 0.7.0 (Debian's) authenticates only some of the full tiles it loads
	// against their parents, so the leaves above may be unchecked: prove every entry against the root.
	for i, entry := range entries {
		proof, err := tlog.ProveRecord(tree.N, int64(i), hr)
		if err != nil {
			return "", fmt.Errorf("prove entry %d: %v", i, err)
		}
		if err := tlog.CheckRecord(proof, tree.N, tree.Hash, int64(i), tlog.RecordHash(entry)); err != nil {
			return "", fmt.Errorf("check entry %d: %v", i, err)
		}
	}
	return fmt.Sprintf("ok %s size %d root %s: %d entries hash to their leaves, %d inclusion proofs hold",
		origin, tree.N, base64.StdEncoding.EncodeToString(tree.Hash[:]), len(entries), len(entries)), nil
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: tiles_interop DIR")
		os.Exit(2)
	}
	msg, err := check(os.Args[1])
	if err != nil {
		fmt.Println("FAIL:", err)
		os.Exit(1)
	}
	fmt.Println(msg)
}
