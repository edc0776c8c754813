// Included by each ISA file inside its `#pragma GCC target` region and anonymous namespace, so
// every ISA compiles its own copy (internal linkage: nothing here can leak across ISAs).
#pragma once

// Runs tile.operator()<R>(m) over M activation rows: tiles of kMaxTile rows, then the rest, so
// each tile size is a compile-time constant (its accumulators stay in registers).
template <typename Tile>
inline void for_each_tile(int64_t M, const Tile& tile) {
  static_assert(kMaxTile == 4, "the remainder cases below cover tiles of up to 4 rows");
  int64_t m = 0;
  for (; m + kMaxTile <= M; m += kMaxTile) tile.template operator()<kMaxTile>(m);
  switch (M - m) {
    case 3: tile.template operator()<3>(m); break;
    case 2: tile.template operator()<2>(m); break;
    case 1: tile.template operator()<1>(m); break;
    default: break;
  }
}
