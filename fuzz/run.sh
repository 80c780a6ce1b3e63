#!/usr/bin/env bash
# Runs every fuzz target for a bounded time and fails if any of them crashes:
#
#   fuzz/run.sh [SECONDS] [TARGET...]    (default 60 seconds per target, every target)
#
# How this runs on stable Rust, with no nightly toolchain: cargo-fuzz instruments the build
# with `-Cpasses=sancov-module` and `-Cllvm-args=-sanitizer-coverage-*`, which stable rustc
# takes, and with `-Zsanitizer=address`, which it refuses ("the option `Z` is only accepted on
# the nightly compiler"). RUSTC_BOOTSTRAP=1 makes stable rustc accept `-Z` flags, and the
# stable toolchain ships the AddressSanitizer runtime in its sysroot
# (lib/rustlib/<host>/lib/librustc-stable_rt.asan.a), so the default build has ASan. Where that
# runtime is missing, or with FUZZ_SANITIZER=none, the targets are built without a sanitizer,
# which needs neither the runtime nor RUSTC_BOOTSTRAP; Rust's own checks (bounds, overflow,
# debug assertions, the targets' asserts) still turn a bug into a crash. The standard library
# is not rebuilt (`-Zbuild-std` would need the rust-src component), so it is not instrumented.
#
# Seeds come from fuzz/seeds/<target>/ (committed) and are copied into fuzz/corpus/<target>/
# (ignored), where libFuzzer adds what it finds. A crash leaves its input in
# fuzz/artifacts/<target>/; `cargo fuzz tmin <target> <file>` shrinks it.
set -euo pipefail
cd "$(dirname "$0")"

seconds=${1:-60}
if ! [[ $seconds =~ ^[0-9]+$ ]] || ((seconds == 0)); then
  echo "usage: fuzz/run.sh [SECONDS] [TARGET...]  (seconds per target, default 60)" >&2
  exit 2
fi
shift $(($# > 0 ? 1 : 0))

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== cargo install cargo-fuzz --locked"
  cargo install cargo-fuzz --locked
fi

sanitizer=${FUZZ_SANITIZER:-address}
if [[ $sanitizer != none ]]; then
  host=$(rustc -vV | sed -n 's/^host: //p')
  runtime_dir="$(rustc --print sysroot)/lib/rustlib/$host/lib"
  short=${sanitizer/address/asan}
  short=${short/leak/lsan}
  short=${short/memory/msan}
  short=${short/thread/tsan}
  if ! compgen -G "$runtime_dir/*$short*" >/dev/null; then
    echo "warning: no $sanitizer sanitizer runtime in $runtime_dir; building without one" >&2
    sanitizer=none
  else
    export RUSTC_BOOTSTRAP=1
  fi
fi

# Built into the usual fuzz/target unless CARGO_TARGET_DIR says otherwise.
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
build=(--sanitizer "$sanitizer" --target-dir "$target_dir")

echo "== cargo fuzz build (sanitizer: $sanitizer)"
cargo fuzz build "${build[@]}"

failed=()
targets=("$@")
if ((${#targets[@]} == 0)); then
  mapfile -t targets < <(cargo fuzz list)
fi
for target in "${targets[@]}"; do
  corpus="corpus/$target"
  mkdir -p "$corpus"
  if [[ -d seeds/$target ]]; then
    cp seeds/"$target"/* "$corpus"/
  fi
  options=(
    -max_total_time="$seconds"
    # Room for several datagrams or requests in one input.
    -max_len=8192
    # A request that waits on a worker gives up after two seconds, so anything near this
    # is a hang.
    -timeout=30
    -print_final_stats=1
  )
  if [[ -f dicts/$target.dict ]]; then
    options+=(-dict="dicts/$target.dict")
  fi
  echo "== cargo fuzz run $target for ${seconds}s"
  if ! cargo fuzz run "${build[@]}" "$target" "$corpus" -- "${options[@]}"; then
    failed+=("$target")
  fi
done

if ((${#failed[@]})); then
  echo "fuzzing found crashes in: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzzing: ${seconds}s per target, no crashes"
