#include "duquant/eigensolver.h"
#include "duquant/pack_linear.h"

namespace duquant {

torch::Tensor canonical_signs(const torch::Tensor& vecs) {
  // argmax returns the first maximal index, which is the "lowest row" tie rule.
  auto rows = vecs.abs().argmax(/*dim=*/-2, /*keepdim=*/true);
  auto pivot = vecs.gather(-2, rows);
  auto sign = torch::where(pivot < 0, -torch::ones_like(pivot), torch::ones_like(pivot));
  return vecs * sign;
}

torch::Tensor column_block_rotations(const torch::Tensor& m, int64_t block) {
  TORCH_CHECK(m.dim() == 2 && m.scalar_type() == torch::kFloat64, "column_block_rotations wants float64 [R, C]");
  const int64_t rows = m.size(0), cols = m.size(1);
  const int64_t full = cols / block, tail = cols % block;
  auto out = torch::empty({full + (tail ? 1 : 0), block, block}, m.options());

  if (full > 0) {
    // All full blocks' Gram matrices in one batched product: [full, B, R] x [full, R, B].
    auto blocks = m.narrow(1, 0, full * block).reshape({rows, full, block}).permute({1, 0, 2});
    auto gram = torch::bmm(blocks.transpose(1, 2), blocks);
    out.narrow(0, 0, full).copy_(canonical_signs(symmetric_eigenvectors_descending(gram)));
  }
  if (tail) {
    auto blk = m.narrow(1, full * block, tail);
    auto gram = torch::mm(blk.t(), blk).unsqueeze(0);
    auto vecs = canonical_signs(symmetric_eigenvectors_descending(gram))[0];
    auto last = out[full];
    last.copy_(torch::eye(block, m.options()));
    last.narrow(0, 0, tail).narrow(1, 0, tail).copy_(vecs);
  }
  return out;
}

torch::Tensor rotate_column_blocks(const torch::Tensor& m, const torch::Tensor& rot) {
  const int64_t rows = m.size(0), cols = m.size(1);
  const int64_t nb = rot.size(0), block = rot.size(1);
  const int64_t padded = nb * block;
  auto src = padded == cols ? m : torch::constant_pad_nd(m, {0, padded - cols});
  // [nb, R, B] x [nb, B, B] -> [nb, R, B] -> [R, nb*B]
  auto blocks = src.reshape({rows, nb, block}).permute({1, 0, 2});
  auto rotated = torch::bmm(blocks, rot.to(m.scalar_type())).permute({1, 0, 2}).reshape({rows, padded});
  return padded == cols ? rotated : rotated.narrow(1, 0, cols).contiguous();
}

}  // namespace duquant
