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

torch::Tensor column_block_rotations(const torch::Tensor& m_in, int64_t block) {
  TORCH_CHECK((m_in.dim() == 2 || m_in.dim() == 3) && m_in.scalar_type() == torch::kFloat64,
              "column_block_rotations wants float64 [R, C] or [L, R, C], got ", m_in.sizes(), " ",
              m_in.scalar_type());
  // A single matrix is a stack of one: both go through the same batched code, so a layer packed
  // alone and inside a stack of equal-shaped layers gets bit-identical rotations.
  const bool single = m_in.dim() == 2;
  const auto m = single ? m_in.unsqueeze(0) : m_in;
  const int64_t layers = m.size(0), rows = m.size(1), cols = m.size(2);
  const int64_t full = cols / block, tail = cols % block;
  auto out = torch::empty({layers, full + (tail ? 1 : 0), block, block}, m.options());

  if (full > 0) {
    // Every full block of every layer in one batched product: [L*full, B, R] x [L*full, R, B].
    auto blocks = m.narrow(2, 0, full * block)
                      .reshape({layers, rows, full, block})
                      .permute({0, 2, 1, 3})
                      .reshape({layers * full, rows, block});
    auto gram = torch::bmm(blocks.transpose(1, 2), blocks);
    auto vecs = canonical_signs(symmetric_eigenvectors_descending(gram));
    out.narrow(1, 0, full).copy_(vecs.reshape({layers, full, block, block}));
  }
  if (tail) {
    // The short last blocks of all layers: one more eigensolver call, embedded in identities.
    auto blk = m.narrow(2, full * block, tail).contiguous();
    auto gram = torch::bmm(blk.transpose(1, 2), blk);
    auto vecs = canonical_signs(symmetric_eigenvectors_descending(gram));
    auto last = out.select(1, full);
    last.copy_(torch::eye(block, m.options()).expand({layers, block, block}));
    last.narrow(1, 0, tail).narrow(2, 0, tail).copy_(vecs);
  }
  return single ? out.squeeze(0) : out;
}

torch::Tensor rotate_column_blocks(const torch::Tensor& m, const torch::Tensor& rot) {
  if (m.dim() == 3) {
    // Stack of layers: m [L, R, C], rot [L, nb, B, B]; all blocks of all layers in one bmm.
    TORCH_CHECK(rot.dim() == 4 && rot.size(0) == m.size(0), "rotate_column_blocks: a stack m [L, R, C] wants rot ",
                "[L, nb, B, B], got ", m.sizes(), " and ", rot.sizes());
    const int64_t layers = m.size(0), rows = m.size(1), cols = m.size(2);
    const int64_t nb = rot.size(1), block = rot.size(2);
    const int64_t padded = nb * block;
    auto src = padded == cols ? m : torch::constant_pad_nd(m, {0, padded - cols});
    auto blocks = src.reshape({layers, rows, nb, block}).permute({0, 2, 1, 3}).reshape({layers * nb, rows, block});
    auto rotated = torch::bmm(blocks, rot.to(m.scalar_type()).reshape({layers * nb, block, block}))
                       .reshape({layers, nb, rows, block})
                       .permute({0, 2, 1, 3})
                       .reshape({layers, rows, padded});
    return padded == cols ? rotated : rotated.narrow(2, 0, cols).contiguous();
  }
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
