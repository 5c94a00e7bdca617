#!/usr/bin/env bash
# Regenerates data/digits.safetensors from the copy of the UCI "Optical Recognition of Handwritten
# Digits" set (1797 8x8 images, CC BY 4.0) that scikit-learn ships inside its wheel. The only
# download is `pip download scikit-learn` (one wheel, no dependencies); the conversion uses only the
# Python standard library (no numpy). Output: two u8 tensors, `images` [1797, 8, 8] (values 0..16 as
# in the CSV) and `labels` [1797] (0..9), written in the safetensors format by hand.
#
# Idempotent: an existing output that passes the check is kept. Usage:
#   scripts/fetch-digits.sh            # writes data/digits.safetensors if missing or invalid
#   scripts/fetch-digits.sh --force    # re-downloads and rewrites it
# SKLEARN_VERSION=1.5.2 pins the wheel (default: the newest one pip finds for this Python).
set -euo pipefail
cd "$(dirname "$0")/.."

out=data/digits.safetensors
force=0
case "${1:-}" in
  --force) force=1 ;;
  "") ;;
  *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

# Checks a safetensors file: header, dtypes, shapes, offsets, 1797 rows, pixels 0..16, labels 0..9.
check() {
  python3 - "$1" <<'PY'
import json, math, struct, sys
path = sys.argv[1]
raw = open(path, "rb").read()
if len(raw) < 8:
    sys.exit(f"{path}: shorter than the 8-byte header length")
(n,) = struct.unpack("<Q", raw[:8])
if 8 + n > len(raw):
    sys.exit(f"{path}: header length {n} runs past the end of the file")
header = json.loads(raw[8:8 + n])
data = raw[8 + n:]
want = {"images": [1797, 8, 8], "labels": [1797]}
for name, shape in want.items():
    t = header.get(name)
    if t is None or t["dtype"] != "U8" or t["shape"] != shape:
        sys.exit(f"{path}: tensor {name} is {t}, expected U8 {shape}")
    a, b = t["data_offsets"]
    if b - a != math.prod(shape) or b > len(data):
        sys.exit(f"{path}: tensor {name} has bad data_offsets {t['data_offsets']}")
img = data[header["images"]["data_offsets"][0]:header["images"]["data_offsets"][1]]
lab = data[header["labels"]["data_offsets"][0]:header["labels"]["data_offsets"][1]]
if max(img) > 16:
    sys.exit(f"{path}: pixel value {max(img)} above 16")
if sorted(set(lab)) != list(range(10)):
    sys.exit(f"{path}: labels {sorted(set(lab))}, expected 0..9")
counts = [lab.count(c) for c in range(10)]
print(f"fetch-digits: {path} ok: 1797 images 8x8, labels 0..9, per class {counts}")
PY
}

if [ "$force" = 0 ] && [ -f "$out" ]; then
  if check "$out"; then
    echo "fetch-digits: $out already present and valid (use --force to regenerate)"
    exit 0
  fi
  echo "fetch-digits: $out fails the check above; regenerating it"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

spec=scikit-learn${SKLEARN_VERSION:+==$SKLEARN_VERSION}
echo "fetch-digits: downloading the $spec wheel (no dependencies)"
python3 -m pip download "$spec" --no-deps --only-binary=:all: --quiet -d "$tmp/wheel"
wheel=$(ls "$tmp"/wheel/scikit_learn-*.whl)
echo "fetch-digits: got $(basename "$wheel")"

mkdir -p data
echo "fetch-digits: converting sklearn/datasets/data/digits.csv.gz to $out"
python3 - "$wheel" "$tmp/digits.safetensors" <<'PY'
import gzip, json, struct, sys, zipfile
wheel, dst = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    csv = gzip.decompress(z.read("sklearn/datasets/data/digits.csv.gz")).decode("ascii")
rows = [line.split(",") for line in csv.splitlines() if line.strip()]
if len(rows) != 1797 or any(len(r) != 65 for r in rows):
    sys.exit(f"unexpected CSV: {len(rows)} rows, widths {sorted({len(r) for r in rows})}")
# Each row: 64 pixel counts (0..16, row-major 8x8), then the label. Values are written as floats
# ("0.0") in some versions and as integers in others.
images = bytearray()
labels = bytearray()
for r in rows:
    vals = [int(float(v)) for v in r]
    if any(not 0 <= v <= 16 for v in vals[:64]) or not 0 <= vals[64] <= 9:
        sys.exit(f"value out of range in row {r}")
    images.extend(vals[:64])
    labels.append(vals[64])
# safetensors: u64 little-endian header length, a JSON header mapping each tensor name to its
# dtype, shape and [begin, end) byte offsets into the data section, then the data. Tensors are
# laid out in name order (images, then labels), as the reference writer does; the header is
# padded with spaces to a multiple of 8 bytes so the data section is aligned.
header = {
    "images": {"dtype": "U8", "shape": [1797, 8, 8], "data_offsets": [0, len(images)]},
    "labels": {"dtype": "U8", "shape": [1797],
               "data_offsets": [len(images), len(images) + len(labels)]},
}
h = json.dumps(header, separators=(",", ":")).encode()
h += b" " * (-len(h) % 8)
with open(dst, "wb") as f:
    f.write(struct.pack("<Q", len(h)))
    f.write(h)
    f.write(images)
    f.write(labels)
PY

check "$tmp/digits.safetensors"
# Replace the output only once the new file has passed the check (no half-written file in data/).
mv "$tmp/digits.safetensors" "$out"
echo "fetch-digits: wrote $out ($(wc -c <"$out") bytes) from $(basename "$wheel")"
