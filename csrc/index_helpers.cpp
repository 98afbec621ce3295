// GPT dataset index builders (document, sample, shuffle and blending indices).
//
// The document, sample and shuffle indices equal those of megatron-core's GPTDataset (0.16.1)
// for the same inputs; the tests compare them with the installed megatron-core and with the
// numpy twins in tests/index_reference.py.
// Megatron draws both shuffles from one numpy.random.RandomState(seed), document index first;
// that generator is reproduced here exactly, so no numpy call is on the hot path:
//
//   generator  MT19937 seeded by init_genrand(seed), seed in [0, 2^32): what RandomState(seed)
//              does for an integer seed, and what std::mt19937(seed) is by the C++ standard
//              ([rand.eng.mers]).
//   interval   RandomState's bounded draw in [0, max] (numpy's legacy random_interval): mask =
//              the smallest 2^k - 1 >= max; draw (next32() & mask) until it is <= max. For
//              max >= 2^32 each draw is ((next32() << 32) | next32()) & mask, first output high.
//   shuffle    RandomState.shuffle: for i = n-1 down to 1: swap(a[i], a[interval(i)]).
//
// All loops run with the GIL released; arrays are allocated (and inputs checked) with it held.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

// numpy.random.RandomState(seed) as far as shuffle uses it (see the header).
class LegacyRandomState {
 public:
  explicit LegacyRandomState(int64_t seed) : gen_(check_seed(seed)) {}

  uint32_t next32() { return static_cast<uint32_t>(gen_()); }

  // Uniform in [0, max], by masked rejection, drawing exactly what numpy draws.
  uint64_t interval(uint64_t max) {
    if (max == 0) return 0;
    const uint64_t mask = ~uint64_t{0} >> __builtin_clzll(max);
    uint64_t value;
    if (max <= 0xFFFFFFFFULL) {
      do value = next32() & mask; while (value > max);
    } else {
      do {
        const uint64_t high = next32();
        value = ((high << 32) | next32()) & mask;
      } while (value > max);
    }
    return value;
  }

 private:
  static uint32_t check_seed(int64_t seed) {
    if (seed < 0 || seed > 0xFFFFFFFFLL)
      throw std::invalid_argument("seed must be in [0, 2^32 - 1] (numpy.random.RandomState), got " +
                                  std::to_string(seed));
    return static_cast<uint32_t>(seed);
  }
  std::mt19937 gen_;
};

// RandomState.shuffle of a[0..n). The swap partners do not depend on the array contents, so
// they are drawn kLookahead steps ahead and their cache lines prefetched: on arrays far larger
// than the cache (the 100B-token case) this hides most of the memory latency of the random
// accesses. The sequence of draws and swaps is exactly the plain loop's.
template <typename T>
void legacy_shuffle(T *a, int64_t n, LegacyRandomState &rng) {
  constexpr int64_t kLookahead = 32;
  if (n < 2) return;
  int64_t ring[kLookahead];
  int64_t next_i = n - 1;  // next i whose partner is to be drawn
  auto draw = [&](int64_t i) {
    const int64_t j = static_cast<int64_t>(rng.interval(static_cast<uint64_t>(i)));
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

// Document index: the sequence ids [begin, end) tiled num_epochs times, then shuffled by rng.
// With separate_final_epoch the first num_epochs-1 copies are shuffled together and then the
// last copy on its own (the same generator continuing), so the early epochs are full
// permutations; Megatron builds it so when the last epoch supplies too few samples.
py::array_t<int32_t> build_document_index(int64_t begin, int64_t end, int64_t num_epochs,
                                          bool separate_final_epoch, LegacyRandomState &rng) {
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
    if (separate_final_epoch) {
      const int64_t first = per_epoch * (num_epochs - 1);
      legacy_shuffle(a, first, rng);
      legacy_shuffle(a + first, per_epoch, rng);
    } else {
      legacy_shuffle(a, total, rng);
    }
  }
  return out;
}

// Sample index [num_samples + 1, 2] of (row in document_index, offset), Megatron's layout. Read
// the sequences in document_index order as one token stream; with x = add_extra_token (0 or 1),
// sample i is the seq_length + x tokens from stream position i * seq_length. Row i + 1 says where
// sample i ends: the row holding its last token and that token's offset + 1 - x (so with x = 1
// consecutive samples share a token, and with x = 0 a sample ending a sequence is recorded as
// (that row, its length)). Row 0 is (0, 0). Zero-length sequences are stepped over. When the
// stream runs out inside a sample: with allow_partial the row is (last row, its length - x) --
// the partial last sample Megatron keeps when it does not drop it -- else an error.
py::array_t<int64_t> build_sample_index(CArray<int32_t> sizes, CArray<int32_t> document_index,
                                        int64_t seq_length, int64_t num_samples,
                                        bool add_extra_token, bool allow_partial) {
  if (seq_length < 1) throw std::invalid_argument("build_sample_index: seq_length must be >= 1");
  if (num_samples < 0) throw std::invalid_argument("build_sample_index: num_samples must be >= 0");
  const int32_t *sz = sizes.data();
  const int32_t *doc = document_index.data();
  const int64_t num_sizes = sizes.size(), num_rows = document_index.size();
  const int64_t extra = add_extra_token ? 1 : 0;
  py::array_t<int64_t> out({num_samples + 1, static_cast<int64_t>(2)});
  int64_t *o = out.mutable_data();
  std::string error;
  {
    py::gil_scoped_release nogil;
    int64_t pos = 0, off = 0;
    o[0] = 0;
    o[1] = 0;
    for (int64_t i = 1; i <= num_samples && error.empty(); ++i) {
      // Tokens of sample i-1 still to be placed, counting the one at (pos, off).
      int64_t remaining = seq_length + extra;
      while (true) {
        if (pos >= num_rows) {
          error = "build_sample_index: the document index is empty";
          break;
        }
        const int32_t d = doc[pos];
        if (d < 0 || d >= num_sizes || sz[d] < 0) {
          error = "build_sample_index: document index row " + std::to_string(pos) +
                  " names sequence " + std::to_string(d) + ", outside sizes[" +
                  std::to_string(num_sizes) + "] or with a negative length";
          break;
        }
        const int64_t avail = static_cast<int64_t>(sz[d]) - off;  // tokens left in this row
        if (remaining <= avail) {
          off += remaining - extra;
          break;
        }
        remaining -= avail;
        if (pos == num_rows - 1) {  // the stream ends inside this sample
          if (!allow_partial)
            error = "build_sample_index: the document index holds fewer than " +
                    std::to_string(num_samples) + " samples of " + std::to_string(seq_length) +
                    " tokens (ran out at sample " + std::to_string(i - 1) + ")";
          off = static_cast<int64_t>(sz[d]) - extra;
          break;
        }
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

// Shuffle index: [0, first) shuffled by rng, then [first, total) shuffled by it (first ==
// total: one shuffle), as Megatron's _build_shuffle_index.
py::array_t<int64_t> build_shuffle_index(int64_t total, int64_t first, LegacyRandomState &rng) {
  if (total < 0 || first < 0 || first > total)
    throw std::invalid_argument("build_shuffle_index: need 0 <= first <= total");
  py::array_t<int64_t> out(total);
  int64_t *a = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    for (int64_t i = 0; i < total; ++i) a[i] = i;
    legacy_shuffle(a, first, rng);
    legacy_shuffle(a + first, total - first, rng);
  }
  return out;
}

std::vector<double> checked_weights(const CArray<double> &weights, const char *who) {
  const int64_t k_count = weights.size();
  if (k_count < 1 || k_count > std::numeric_limits<int16_t>::max())
    throw std::invalid_argument(std::string(who) + ": need 1 to 32767 weights");
  std::vector<double> w(weights.data(), weights.data() + k_count);
  bool any_positive = false;
  for (double x : w) {
    if (!std::isfinite(x) || x < 0)
      throw std::invalid_argument(std::string(who) + ": weights must be finite and >= 0");
    any_positive = any_positive || x > 0;
  }
  if (!any_positive) throw std::invalid_argument(std::string(who) + ": all weights are 0");
  return w;
}

// A blend of `size` rows over k_count datasets: choose(row, drawn) names the dataset row `row`
// draws from, given how many each has given so far; the row records (that dataset, drawn[it])
// and drawn[it] grows by one.
template <typename Choose>
std::pair<py::array_t<int16_t>, py::array_t<int64_t>> run_blend(int64_t k_count, int64_t size,
                                                                const char *who, Choose choose) {
  if (size < 0) throw std::invalid_argument(std::string(who) + ": size must be >= 0");
  py::array_t<int16_t> dataset_index(size);
  py::array_t<int64_t> sample_index(size);
  int16_t *di = dataset_index.mutable_data();
  int64_t *si = sample_index.mutable_data();
  {
    py::gil_scoped_release nogil;
    std::vector<int64_t> drawn(k_count, 0);
    for (int64_t row = 0; row < size; ++row) {
      const int64_t k = choose(row, drawn);
      di[row] = static_cast<int16_t>(k);
      si[row] = drawn[k]++;
    }
  }
  return {dataset_index, sample_index};
}

// Blending index: Tijdeman's solution of the "chairman assignment problem" (R. Tijdeman, 1980),
// which keeps every dataset's count within 1 - delta < 1 of its ideal share after *every* step.
// (Megatron's greedy rule, build_blending_index_megatron below, can fall more than one behind
// with three or more datasets: weights 8, 8, 1.0625, 1.0625, 1.0625 give the second dataset 18
// of its 19.18 after 46 steps.)
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
  const std::vector<double> w = checked_weights(weights, "build_blending_index");
  const int64_t k_count = static_cast<int64_t>(w.size());
  int64_t positive = 0;
  for (double x : w) positive += x > 0;
  const double delta = positive > 1 ? 1.0 / static_cast<double>(2 * positive - 2) : 0.0;
  return run_blend(k_count, size, "build_blending_index",
                   [&](int64_t row, const std::vector<int64_t> &drawn) {
    const double steps = static_cast<double>(row + 1);
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
    return best;
  });
}

// Megatron's blending rule (megatron-core's build_blending_indices), for blend_rule="megatron":
// at output row r (0-based) dataset k's error is weights[k] * max(r, 1) - drawn[k]; the largest
// error is drawn, lowest k on ties. It can fall more than one sample behind a dataset's share
// with three or more datasets (see build_blending_index above).
std::pair<py::array_t<int16_t>, py::array_t<int64_t>> build_blending_index_megatron(
    CArray<double> weights, int64_t size) {
  const std::vector<double> w = checked_weights(weights, "build_blending_index_megatron");
  const int64_t k_count = static_cast<int64_t>(w.size());
  return run_blend(k_count, size, "build_blending_index_megatron",
                   [&](int64_t row, const std::vector<int64_t> &drawn) {
    const double steps = row > 1 ? static_cast<double>(row) : 1.0;
    int64_t best = 0;
    double best_error = w[0] * steps - static_cast<double>(drawn[0]);
    for (int64_t k = 1; k < k_count; ++k) {
      const double error = w[k] * steps - static_cast<double>(drawn[k]);
      if (error > best_error) {
        best = k;
        best_error = error;
      }
    }
    return best;
  });
}

// Exposed for tests: raw generator outputs and bounded draws, to compare with numpy's.
py::array_t<uint32_t> random_state_outputs(LegacyRandomState &rng, int64_t count) {
  if (count < 0) throw std::invalid_argument("count must be >= 0");
  py::array_t<uint32_t> out(count);
  uint32_t *o = out.mutable_data();
  for (int64_t i = 0; i < count; ++i) o[i] = rng.next32();
  return out;
}

py::array_t<uint64_t> random_state_intervals(LegacyRandomState &rng, uint64_t max, int64_t count) {
  if (count < 0) throw std::invalid_argument("count must be >= 0");
  py::array_t<uint64_t> out(count);
  uint64_t *o = out.mutable_data();
  for (int64_t i = 0; i < count; ++i) o[i] = rng.interval(max);
  return out;
}

}  // namespace

void bind_index_helpers(py::module_ &m) {
  py::class_<LegacyRandomState>(m, "LegacyRandomState",
                                "numpy.random.RandomState(seed) as its shuffle uses it: MT19937 "
                                "with init_genrand seeding, seed in [0, 2^32 - 1]. Not thread-safe.")
      .def(py::init<int64_t>(), py::arg("seed"))
      .def("outputs", &random_state_outputs, py::arg("count"),
           "uint32[count]: the next raw 32-bit outputs.")
      .def("intervals", &random_state_intervals, py::arg("max"), py::arg("count"),
           "uint64[count]: the next bounded draws in [0, max], as RandomState.shuffle draws them.");
  m.def("build_document_index", &build_document_index, py::arg("begin"), py::arg("end"),
        py::arg("num_epochs"), py::arg("separate_final_epoch"), py::arg("rng"),
        "int32[(end-begin)*num_epochs]: sequence ids [begin, end) tiled num_epochs times and "
        "shuffled by rng (RandomState.shuffle); the final copy shuffled on its own when "
        "separate_final_epoch.");
  m.def("build_sample_index", &build_sample_index, py::arg("sizes"), py::arg("document_index"),
        py::arg("seq_length"), py::arg("num_samples"), py::arg("add_extra_token"),
        py::arg("allow_partial"),
        "int64[num_samples+1, 2] of (row in document_index, offset): where each sample of "
        "seq_length + add_extra_token tokens ends, in Megatron's layout (see index_helpers.cpp).");
  m.def("build_shuffle_index", &build_shuffle_index, py::arg("total"), py::arg("first"),
        py::arg("rng"),
        "int64[total]: [0, first) and then [first, total) shuffled by rng.");
  m.def("build_blending_index", &build_blending_index, py::arg("weights"), py::arg("size"),
        "(int16[size] dataset, int64[size] sample-within-dataset) by Tijdeman's rule: every "
        "count stays within 1 - 1/(2K-2) of weights[k] * steps (see index_helpers.cpp).");
  m.def("build_blending_index_megatron", &build_blending_index_megatron, py::arg("weights"),
        py::arg("size"),
        "(int16[size] dataset, int64[size] sample-within-dataset) by Megatron's greedy rule: "
        "row r draws the largest weights[k] * max(r, 1) - drawn[k], lowest k on ties.");
}
