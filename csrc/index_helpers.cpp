// GPT dataset index builders (document, sample, shuffle and blending indices).
//
// Every function here has a plain-Python twin in tests/index_reference.py and the two
// must agree element for element; the tests compare them on random inputs. The randomness is
// therefore defined here once, precisely:
//
//   PRNG      splitmix64 (Steele, Lea & Flood 2014): state += 0x9E3779B97F4A7C15, then the
//             output is the state passed through the splitmix64 finaliser. The state starts at
//             the seed (any 64-bit value).
//   bounded   uniform integer in [0, n): Lemire's multiply-shift with rejection (unbiased):
//             m = x * n (128-bit); if low64(m) < (2^64 - n) mod n draw x again; result high64(m).
//   shuffle   Fisher-Yates from the back: for i = n-1 down to 1: swap(a[i], a[bounded(i+1)]).
//
// All loops run with the GIL released; arrays are allocated (and inputs checked) with it held.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}

  uint64_t next() {
    state_ += 0x9E3779B97F4A7C15ULL;
    uint64_t z = state_;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }

  // Uniform in [0, n) for n >= 1 (Lemire 2019, "Fast random integer generation in an interval").
  uint64_t below(uint64_t n) {
    __uint128_t m = static_cast<__uint128_t>(next()) * n;
    uint64_t low = static_cast<uint64_t>(m);
    if (low < n) {
      const uint64_t threshold = (0 - n) % n;  // (2^64 - n) mod n
      while (low < threshold) {
        m = static_cast<__uint128_t>(next()) * n;
        low = static_cast<uint64_t>(m);
      }
    }
    return static_cast<uint64_t>(m >> 64);
  }

 private:
  uint64_t state_;
};

// Fisher-Yates shuffle of a[0..n). The swap partners do not depend on the array contents, so
// they are drawn kLookahead steps ahead and their cache lines prefetched: on arrays far larger
// than the cache (the 100B-token case) this hides most of the memory latency of the random
// accesses. The sequence of swaps is exactly the plain loop's.
template <typename T>
void fisher_yates(T *a, int64_t n, SplitMix64 &rng) {
  constexpr int64_t kLookahead = 32;
  if (n < 2) return;
  int64_t ring[kLookahead];
  int64_t next_i = n - 1;  // next i whose partner is to be drawn
  auto draw = [&](int64_t i) {
    const int64_t j = static_cast<int64_t>(rng.below(static_cast<uint64_t>(i) + 1));
    ring[i % kLookahead] = j;
    __builtin_prefetch(a + j, 1);
  };
  for (int64_t k = 0; k < kLookahead && next_i > 0; ++k) draw(next_i--);
  for (int64_t i = n - 1; i > 0; --i) {
    const int64_t j = ring[i % kLookahead];
    if (next_i > 0) draw(next_i--);
    std::swap(a[i], a[j]);
  }
}

template <typename T>
using CArray = py::array_t<T, py::array::c_style | py::array::forcecast>;

// Document index: the sequence ids [begin, end) tiled num_epochs times, then shuffled. With
// separate_final_epoch the first num_epochs-1 copies are shuffled together and the last copy on
// its own (continuing the same generator), so the early epochs are full permutations.
py::array_t<int32_t> build_document_index(int64_t begin, int64_t end, int64_t num_epochs,
                                          bool separate_final_epoch, uint64_t seed) {
  if (begin < 0 || end < begin || end > static_cast<int64_t>(std::numeric_limits<int32_t>::max()) + 1)
    throw std::invalid_argument("build_document_index: need 0 <= begin <= end <= 2^31, got [" +
                                std::to_string(begin) + ", " + std::to_string(end) + ")");
  if (num_epochs < 1)
    throw std::invalid_argument("build_document_index: num_epochs must be >= 1");
  if (separate_final_epoch && num_epochs < 2)
    throw std::invalid_argument("build_document_index: separate_final_epoch needs num_epochs >= 2");
  const int64_t per_epoch = end - begin;
  if (per_epoch > 0 && num_epochs > std::numeric_limits<int64_t>::max() / per_epoch)
    throw std::invalid_argument("build_document_index: num_epochs * documents overflows");
  const int64_t total = per_epoch * num_epochs;
  py::array_t<int32_t> out(total);
  int32_t *a = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    for (int64_t e = 0; e < num_epochs; ++e)
      for (int64_t d = 0; d < per_epoch; ++d) a[e * per_epoch + d] = static_cast<int32_t>(begin + d);
    SplitMix64 rng(seed);
    if (separate_final_epoch) {
      const int64_t first = per_epoch * (num_epochs - 1);
      fisher_yates(a, first, rng);
      fisher_yates(a + first, per_epoch, rng);
    } else {
      fisher_yates(a, total, rng);
    }
  }
  return out;
}

// Sample index [num_samples + 1, 2] of (row in document_index, token offset). Read the documents
// in document_index order as one token stream; row i is where token i * seq_length lies (row 0
// is (0, 0) by convention). Sample i is the seq_length + 1 tokens from row i to row i + 1
// inclusive, so consecutive samples share one token. Zero-length documents are stepped over.
py::array_t<int64_t> build_sample_index(CArray<int32_t> sizes, CArray<int32_t> document_index,
                                        int64_t seq_length, int64_t num_samples) {
  if (seq_length < 1) throw std::invalid_argument("build_sample_index: seq_length must be >= 1");
  if (num_samples < 0) throw std::invalid_argument("build_sample_index: num_samples must be >= 0");
  const int32_t *sz = sizes.data();
  const int32_t *doc = document_index.data();
  const int64_t num_sizes = sizes.size(), num_rows = document_index.size();
  py::array_t<int64_t> out({num_samples + 1, static_cast<int64_t>(2)});
  int64_t *o = out.mutable_data();
  std::string error;
  {
    py::gil_scoped_release nogil;
    int64_t pos = 0, off = 0;
    o[0] = 0;
    o[1] = 0;
    for (int64_t i = 1; i <= num_samples && error.empty(); ++i) {
      // Tokens of sample i-1 still to be placed, counting the one at the current position.
      int64_t remaining = seq_length + 1;
      while (true) {
        if (pos >= num_rows) {
          error = "build_sample_index: the document index holds fewer than " +
                  std::to_string(num_samples) + " samples of " + std::to_string(seq_length) +
                  " tokens (ran out at sample " + std::to_string(i - 1) + ")";
          break;
        }
        const int32_t d = doc[pos];
        if (d < 0 || d >= num_sizes || sz[d] < 0) {
          error = "build_sample_index: document index row " + std::to_string(pos) +
                  " names sequence " + std::to_string(d) + ", outside sizes[" +
                  std::to_string(num_sizes) + "] or with a negative length";
          break;
        }
        const int64_t avail = static_cast<int64_t>(sz[d]) - off;  // tokens left in this document
        if (remaining <= avail) {
          off += remaining - 1;
          break;
        }
        remaining -= avail;
        ++pos;
        off = 0;
      }
      o[2 * i] = pos;
      o[2 * i + 1] = off;
    }
  }
  if (!error.empty()) throw std::invalid_argument(error);
  return out;
}

// Shuffle index: a permutation of [0, num_samples). [0, first) and [first, num_samples) are
// shuffled separately (first == num_samples: one shuffle), continuing the same generator.
py::array_t<int64_t> build_shuffle_index(int64_t num_samples, int64_t first, uint64_t seed) {
  if (num_samples < 0 || first < 0 || first > num_samples)
    throw std::invalid_argument("build_shuffle_index: need 0 <= first <= num_samples");
  py::array_t<int64_t> out(num_samples);
  int64_t *a = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    for (int64_t i = 0; i < num_samples; ++i) a[i] = i;
    SplitMix64 rng(seed);
    fisher_yates(a, first, rng);
    fisher_yates(a + first, num_samples - first, rng);
  }
  return out;
}

// Blending index: Tijdeman's solution of the "chairman assignment problem" (R. Tijdeman, 1980),
// which keeps every dataset's count within 1 - delta < 1 of its ideal share after *every* step.
// (The simpler "draw the largest weights[k] * (t + 1) - drawn[k]" rule can drift past one with
// three or more datasets, e.g. weights 8, 8, 1.0625, 1.0625, 1.0625 at step 12.)
//
//   K      number of positive weights; delta = 1 / (2K - 2), or 0 when K == 1
//   step t (1-based; output row t - 1): dataset k is eligible when weights[k] > 0 and
//          weights[k] * t - drawn[k] >= delta; draw the eligible k with the smallest deadline
//          (drawn[k] + 1 - delta) / weights[k], lowest k on ties. Should rounding leave no
//          dataset eligible, draw the k with the largest weights[k] * t - drawn[k].
//   row    dataset_index[t - 1] = k, dataset_sample_index[t - 1] = drawn[k]; drawn[k] += 1.
//
// Weights are used as given (callers normalise them to sum to 1). All arithmetic is IEEE double
// in exactly the order written, as in the Python twin: setup.py builds with -std=c++17, an ISO
// mode in which GCC does not contract a * b - c into an FMA, and without -ffast-math. The tests
// compare both twins bit for bit, so a toolchain that differs is caught.
std::pair<py::array_t<int16_t>, py::array_t<int64_t>> build_blending_index(CArray<double> weights,
                                                                           int64_t size) {
  const int64_t k_count = weights.size();
  if (k_count < 1 || k_count > std::numeric_limits<int16_t>::max())
    throw std::invalid_argument("build_blending_index: need 1 to 32767 weights");
  if (size < 0) throw std::invalid_argument("build_blending_index: size must be >= 0");
  const double *w = weights.data();
  int64_t positive = 0;
  for (int64_t k = 0; k < k_count; ++k) {
    if (!std::isfinite(w[k]) || w[k] < 0)
      throw std::invalid_argument("build_blending_index: weights must be finite and >= 0");
    positive += w[k] > 0;
  }
  if (positive == 0) throw std::invalid_argument("build_blending_index: all weights are 0");
  const double delta = positive > 1 ? 1.0 / static_cast<double>(2 * positive - 2) : 0.0;
  py::array_t<int16_t> dataset_index(size);
  py::array_t<int64_t> sample_index(size);
  int16_t *di = dataset_index.mutable_data();
  int64_t *si = sample_index.mutable_data();
  {
    py::gil_scoped_release nogil;
    std::vector<int64_t> drawn(k_count, 0);
    for (int64_t t = 1; t <= size; ++t) {
      const double steps = static_cast<double>(t);
      int64_t best = -1;
      double best_deadline = 0;
      for (int64_t k = 0; k < k_count; ++k) {
        if (!(w[k] > 0)) continue;
        const double deficit = w[k] * steps - static_cast<double>(drawn[k]);
        if (deficit < delta) continue;
        const double deadline = (static_cast<double>(drawn[k]) + 1.0 - delta) / w[k];
        if (best < 0 || deadline < best_deadline) {
          best = k;
          best_deadline = deadline;
        }
      }
      if (best < 0) {  // rounding fallback: the largest deficit
        double best_deficit = 0;
        for (int64_t k = 0; k < k_count; ++k) {
          const double deficit = w[k] * steps - static_cast<double>(drawn[k]);
          if (best < 0 || deficit > best_deficit) {
            best = k;
            best_deficit = deficit;
          }
        }
      }
      di[t - 1] = static_cast<int16_t>(best);
      si[t - 1] = drawn[best]++;
    }
  }
  return {dataset_index, sample_index};
}

// Exposed for tests: the first `count` raw splitmix64 outputs and bounded draws.
py::array_t<uint64_t> splitmix64_outputs(uint64_t seed, int64_t count, uint64_t bound) {
  if (count < 0) throw std::invalid_argument("count must be >= 0");
  py::array_t<uint64_t> out(count);
  uint64_t *o = out.mutable_data();
  SplitMix64 rng(seed);
  for (int64_t i = 0; i < count; ++i) o[i] = bound == 0 ? rng.next() : rng.below(bound);
  return out;
}

}  // namespace

void bind_index_helpers(py::module_ &m) {
  m.def("build_document_index", &build_document_index, py::arg("begin"), py::arg("end"),
        py::arg("num_epochs"), py::arg("separate_final_epoch"), py::arg("seed"),
        "int32[(end-begin)*num_epochs]: sequence ids [begin, end) tiled num_epochs times and "
        "shuffled (splitmix64 + Fisher-Yates); the final copy shuffled on its own when "
        "separate_final_epoch.");
  m.def("build_sample_index", &build_sample_index, py::arg("sizes"), py::arg("document_index"),
        py::arg("seq_length"), py::arg("num_samples"),
        "int64[num_samples+1, 2] of (row in document_index, token offset): row i is where token "
        "i*seq_length of the document stream lies.");
  m.def("build_shuffle_index", &build_shuffle_index, py::arg("num_samples"), py::arg("first"),
        py::arg("seed"),
        "int64[num_samples]: permutation of the sample ids; [0, first) and [first, num_samples) "
        "shuffled separately.");
  m.def("build_blending_index", &build_blending_index, py::arg("weights"), py::arg("size"),
        "(int16[size] dataset, int64[size] sample-within-dataset) by Tijdeman's rule: every "
        "count stays within 1 - 1/(2K-2) of weights[k] * steps (see index_helpers.cpp).");
  m.def("splitmix64_outputs", &splitmix64_outputs, py::arg("seed"), py::arg("count"),
        py::arg("bound") = 0,
        "First `count` splitmix64 outputs from `seed` (bound == 0) or bounded draws in [0, bound).");
}
