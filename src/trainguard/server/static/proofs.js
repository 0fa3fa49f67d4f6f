// Inclusion proofs checked in the browser, with WebCrypto, independently of the server's word:
//   leaf = SHA-256(0x00 || entry); fold the RFC 9162 (2.1.3.2) audit path to a root; compare it with the
//   root of the signed checkpoint; verify the checkpoint note's Ed25519 signature (C2SP signed-note)
//   with the key in use: the one pinned in this browser, else one given as ?key=, else the server's.
"use strict";
(() => {
  const PIN = "trainguard.pinnedKey";
  const SEEN = "trainguard.seenHeads";
  const encoder = new TextEncoder();
  let headSize = -1;  // the size of the newest signed head a proof on this page verified against

  function b64(text) {
    if (typeof text !== "string" || !/^[A-Za-z0-9+/]*={0,2}$/.test(text) || text.length % 4 !== 0) {
      throw new Error("malformed base64");
    }
    return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  }
  const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  function concat(...parts) {
    const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) { out.set(p, at); at += p.length; }
    return out;
  }
  const sha256 = async (bytes) => new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  const leafHash = (entry) => sha256(concat(Uint8Array.of(0), entry));
  const nodeHash = (left, right) => sha256(concat(Uint8Array.of(1), left, right));
  const half = (n) => Math.floor(n / 2);

  // RFC 9162 section 2.1.3.2: the root that `proof` gives for leaf `index` in a tree of `size`.
  async function rootFromProof(index, size, leaf, proof) {
    if (!Number.isSafeInteger(index) || !Number.isSafeInteger(size) || index < 0 || index >= size) {
      throw new Error(`entry ${index} is outside a tree of ${size}`);
    }
    let fn = index, sn = size - 1, r = leaf;
    for (const p of proof) {
      if (p.length !== 32) throw new Error("a proof hash is not 32 bytes");
      if (sn === 0) throw new Error("the proof is longer than the tree allows");
      if (fn % 2 === 1 || fn === sn) {
        r = await nodeHash(p, r);
        while (fn % 2 === 0 && fn !== 0) { fn = half(fn); sn = half(sn); }
      } else {
        r = await nodeHash(r, p);
      }
      fn = half(fn); sn = half(sn);
    }
    if (sn !== 0) throw new Error("the proof is shorter than the tree needs");
    return r;
  }

  // A C2SP verifier key: name+keyid+base64(0x01 || 32-byte Ed25519 public key).
  async function parseKey(text) {
    text = text.trim();
    const first = text.indexOf("+"), second = text.indexOf("+", first + 1);
    if (first < 1 || second < 0) throw new Error("the key is not NAME+KEYID+KEYDATA");
    const name = text.slice(0, first), id = text.slice(first + 1, second);
    if (/\s/.test(name) || !/^[0-9a-f]{8}$/i.test(id)) throw new Error("the key's name or id is malformed");
    const raw = b64(text.slice(second + 1));
    if (raw.length !== 33 || raw[0] !== 1) throw new Error("the key is not an Ed25519 note key");
    const keyId = (await sha256(concat(encoder.encode(name + "\n"), raw))).slice(0, 4);
    if (hex(keyId) !== id.toLowerCase()) throw new Error("the key's id does not match its name and bytes");
    const key = await crypto.subtle.importKey("raw", raw.slice(1), { name: "Ed25519" }, false, ["verify"]);
    return { name, keyId, key, fingerprint: hex(await sha256(encoder.encode(text))) };
  }

  // The checkpoint in a signed note, once a signature by `key` verifies.
  async function openCheckpoint(note, key) {
    const split = note.lastIndexOf("\n\n");
    if (split < 0 || !note.endsWith("\n")) throw new Error("the checkpoint note is malformed");
    const text = note.slice(0, split + 1);
    const lines = note.slice(split + 2, -1).split("\n");
    const mine = [], names = [];
    for (const line of lines) {
      if (!line.startsWith("\u2014 ")) throw new Error("a signature line of the note is malformed");
      const [name, data] = line.slice(2).split(" ");
      const raw = b64(data || "");
      names.push(`${name}+${hex(raw.slice(0, 4))}`);
      if (name === key.name && hex(raw.slice(0, 4)) === hex(key.keyId)) mine.push(raw.slice(4));
    }
    if (!mine.length) throw new Error(`the checkpoint is not signed by the key in use; it is signed by ${names.join(", ")}`);
    for (const signature of mine) {
      if (!(await crypto.subtle.verify({ name: "Ed25519" }, key.key, signature, encoder.encode(text)))) {
        throw new Error("the checkpoint's signature is invalid");
      }
    }
    const body = text.slice(0, -1).split("\n");
    if (body.length < 3 || !/^(0|[1-9][0-9]{0,15})$/.test(body[1])) throw new Error("the checkpoint is malformed");
    const root = b64(body[2]);
    if (root.length !== 32) throw new Error("the checkpoint's root is not 32 bytes");
    return { origin: body[0], size: Number(body[1]), root };
  }

  // A key pinned in this browser wins over one in the address: a link someone sends cannot replace it.
  function pinned() {
    const stored = localStorage.getItem(PIN);
    if (stored) return { text: stored, how: "the key pinned in this browser" };
    const fromUrl = new URLSearchParams(location.search).get("key");
    if (fromUrl) return { text: fromUrl, how: "the key given in the address (?key=), not pinned" };
    return null;
  }

  function keyText() {
    const pin = pinned();
    if (pin) return pin;
    const panel = document.getElementById("keys");
    return { text: panel ? panel.dataset.serverKey : "", how: "the server's own key (not pinned: the server's word)" };
  }

  // A head this browser saw before, for the same key: a smaller size, or another root at the same size,
  // is a log rolled back or forked.
  function checkHistory(fingerprint, head) {
    const seen = JSON.parse(localStorage.getItem(SEEN) || "{}");
    const before = seen[fingerprint];
    if (before && head.size < before.size) {
      throw new Error(`the signed head (size ${head.size}) is older than one this browser saw (size ${before.size})`);
    }
    if (before && head.size === before.size && hex(head.root) !== before.root) {
      throw new Error(`the signed head at size ${head.size} has another root than the one this browser saw: a fork`);
    }
    if (!before || head.size > before.size) {
      seen[fingerprint] = { size: head.size, root: hex(head.root) };
      localStorage.setItem(SEEN, JSON.stringify(seen));
    }
  }

  async function verify(index) {
    const { text, how } = keyText();
    let key;
    try { key = await parseKey(text); } catch (e) { throw new Error(`the key in use is unusable: ${e.message}`); }
    const answer = await fetch(`/ui/proof/${index}`, { credentials: "same-origin", cache: "no-store" });
    let doc;
    try { doc = await answer.json(); } catch (e) { throw new Error(`the server's answer is not JSON (${answer.status})`); }
    if (!answer.ok) throw new Error(`the server gave no proof: ${doc.message || answer.status}`);
    if (doc.index !== index) throw new Error(`the server sent the proof of entry ${doc.index}, not ${index}`);
    const head = await openCheckpoint(String(doc.checkpoint), key);
    if (doc.tree_size !== head.size) throw new Error("the proof is for another tree size than the signed head");
    const entry = b64(doc.entry);
    const root = await rootFromProof(index, head.size, await leafHash(entry), (doc.proof || []).map(b64));
    if (hex(root) !== hex(head.root)) {
      throw new Error("the entry and its proof do not lead to the signed root: the entry or the tree was altered");
    }
    checkHistory(key.fingerprint, head);
    headSize = Math.max(headSize, head.size);
    let shown = null;
    try { shown = new TextDecoder("utf-8", { fatal: true }).decode(entry); } catch (e) { shown = null; }
    const pre = document.querySelector(`pre.entry[data-index="${index}"]`);
    const same = pre && shown !== null &&
      (pre.dataset.whole === "yes" ? pre.textContent === shown : shown.startsWith(pre.textContent));
    if (pre && !same) throw new Error("the entry shown on this page is not the bytes that were verified");
    return `in the tree of ${head.size} entries signed by ${key.name} (key ${key.fingerprint.slice(0, 16)}…, ${how})`;
  }

  async function check(button) {
    const index = Number(button.dataset.index);
    const verdict = document.querySelector(`.verdict[data-index="${index}"]`);
    verdict.className = "verdict pending";
    verdict.textContent = "checking…";
    try {
      const why = await verify(index);
      verdict.className = "verdict ok";
      verdict.textContent = "verified";
      verdict.title = why;
    } catch (e) {
      verdict.className = "verdict bad";
      verdict.textContent = `does NOT verify: ${e.message}`;
    }
  }

  // On a page that claims a contiguous range of the log, every index of it must have a verified row: a
  // server that leaves an entry out (an alert it would rather not show) is caught here.
  function complete() {
    const target = document.getElementById("completeness");
    if (!target) return;
    const first = Number(target.dataset.first), end = Number(target.dataset.end);
    const verified = new Set(Array.from(document.querySelectorAll(".verdict.ok"), (v) => Number(v.dataset.index)));
    const missing = [];
    for (let i = first; i < end && missing.length < 20; i++) if (!verified.has(i)) missing.push(i);
    if (!Number.isSafeInteger(first) || !Number.isSafeInteger(end) || end - first > 10000) {
      target.className = "bad";
      target.textContent = "this page does not say which entries it holds";
    } else if (!new URLSearchParams(location.search).has("before") && headSize !== -1 && headSize !== end) {
      target.className = "bad";
      target.textContent = `the signed head holds ${headSize} entries, but this page stops at ${end}`;
    } else if (missing.length) {
      target.className = "bad";
      target.textContent = `entries without a verified row on this page: ${missing.join(", ")}`;
    } else {
      target.className = "ok";
      target.textContent = `every entry from ${first} to ${end - 1} is on this page and verified`;
    }
  }

  async function showKey() {
    const target = document.getElementById("key-in-use");
    if (!target) return;
    const { text, how } = keyText();
    try {
      const key = await parseKey(text);
      target.textContent = `Verifying with ${how}: ${key.name}, SHA-256 ${key.fingerprint}`;
    } catch (e) {
      target.textContent = `The key in use (${how}) is unusable: ${e.message}`;
    }
  }

  function main() {
    const input = document.getElementById("pinned-key");
    if (input) input.value = localStorage.getItem(PIN) || "";
    const save = document.getElementById("pin-save");
    if (save) save.addEventListener("click", () => {
      if (input.value.trim()) localStorage.setItem(PIN, input.value.trim()); else localStorage.removeItem(PIN);
      showKey();
    });
    const clear = document.getElementById("pin-clear");
    if (clear) clear.addEventListener("click", () => { localStorage.removeItem(PIN); input.value = ""; showKey(); });
    for (const button of document.querySelectorAll("button.verify")) button.addEventListener("click", () => check(button));
    const all = document.getElementById("verify-all");
    if (all) all.addEventListener("click", async () => {
      for (const button of document.querySelectorAll("button.verify")) await check(button);
      complete();
    });
    showKey();
  }

  main();
})();
