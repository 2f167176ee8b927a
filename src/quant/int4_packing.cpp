#include "duquant/weight_quant.h"

namespace duquant {

torch::Tensor pack_int4(const torch::Tensor& codes) {
  TORCH_CHECK(codes.dim() == 2, "pack_int4 wants [N, K] codes");
  auto c = codes.to(torch::kInt16);
  const int64_t k = c.size(1);
  if (k % 2) c = torch::constant_pad_nd(c, {0, 1});
  auto pairs = c.reshape({c.size(0), -1, 2});
  auto lo = pairs.select(2, 0).bitwise_and(0xF);
  auto hi = pairs.select(2, 1).bitwise_and(0xF);
  return (lo + hi * 16).to(torch::kUInt8).contiguous();
}

torch::Tensor unpack_int4(const torch::Tensor& packed, int64_t cols) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == torch::kUInt8, "unpack_int4 wants uint8 [N, ceil(K/2)]");
  auto p = packed.to(torch::kInt16);
  // Sign-extend a two's-complement nibble: (v ^ 8) - 8.
  auto lo = p.bitwise_and(0xF).bitwise_xor(8) - 8;
  auto hi = p.bitwise_right_shift(4).bitwise_and(0xF).bitwise_xor(8) - 8;
  auto both = torch::stack({lo, hi}, 2).reshape({p.size(0), -1});
  return both.narrow(1, 0, cols).to(torch::kInt8).contiguous();
}

}  // namespace duquant
