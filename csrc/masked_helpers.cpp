// Sample index of the BERT and T5 datasets: which sentences each sample takes.
//
// Equal, row for row, to megatron-core's helpers.build_mapping (0.16.1) on the same inputs (the
// tests compare them), which MaskedWordPieceDataset calls; the rules it follows:
//
//   documents  a document is used when it has at least min_sentences sentences and, if it has
//              more than one, none longer than kLongSentenceTokens tokens; others are skipped (and
//              counted). Every epoch walks the used documents in file order.
//   target     a target length drawn per sample from std::mt19937(seed): with r = round(1 /
//              short_seq_prob) (0 when the probability is 0), a draw x gives 2 + x % (max_len
//              - 1) when x % r == 0, else max_len. One draw when a document starts and one after
//              every sample, the last sample of a document included.
//   samples    sentences are added until the sample holds >= target tokens, at least
//              min_sentences sentences, and more than one sentence is left in the document;
//              the document's last sentence always ends a sample (so a sample can hold more
//              than target tokens: the dataset trims it). A row is (first sentence, one past
//              the last sentence, target).
//   epochs     with num_samples >= 0, epochs are added until at least num_samples rows exist
//              (checked before each epoch, so the last epoch is complete); with -1, one epoch.
//   shuffle    the rows are shuffled by std::mt19937_64(seed + 1): for i = n-1 down to 1,
//              swap rows i and (next64() % (i + 1)).
//
// Faster than Megatron's by building in one pass (Megatron walks everything twice, first to
// count), by deciding which documents are used once instead of every epoch, and by prefetching
// the shuffle's swap partners. Rows are uint32 when the sentence ids fit, as Megatron's.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <new>
#include <cstdint>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

// Megatron's LONG_SENTENCE_LEN: a document with a longer sentence is skipped (unless it has one
// sentence only).
constexpr int64_t kLongSentenceTokens = 512;

// What the scan of the documents found, in this order (returned as an int64 array).
enum Stat {
  kDocuments,        // documents in the range
  kEmpty,            // with no sentence
  kOneSentence,      // with exactly one sentence
  kLongSentence,     // with several sentences, one of them longer than kLongSentenceTokens tokens
  kSkippedFew,       // skipped: fewer than min_sentences sentences
  kSkippedLong,      // skipped: a long sentence (and enough sentences)
  kEpochs,           // epochs walked
  kNumStats
};

template <typename T>
using CArray = py::array_t<T, py::array::c_style | py::array::forcecast>;

// Megatron's target lengths, drawn in blocks ahead of use (the walk consumes them strictly in
// order, so this only takes the generator out of the walk's inner loop).
class TargetLength {
 public:
  TargetLength(uint32_t seed, double short_seq_prob, int64_t max_len)
      : gen_(seed), max_len_(max_len),
        ratio_(short_seq_prob > 0 ? static_cast<uint64_t>(std::round(1.0 / short_seq_prob)) : 0) {}

  int64_t next() {
    if (ratio_ == 0) return max_len_;  // no draw at all, as in Megatron
    if (pos_ == kBlock) refill();
    return block_[pos_++];
  }

 private:
  static constexpr int kBlock = 1024;
  void refill() {
    for (int k = 0; k < kBlock; ++k) {
      const uint64_t x = gen_();
      const uint64_t span = static_cast<uint64_t>(max_len_ - 1);
      block_[k] = x % ratio_ == 0 ? 2 + static_cast<int64_t>(x % span) : max_len_;
    }
    pos_ = 0;
  }
  std::mt19937 gen_;
  int64_t max_len_;
  uint64_t ratio_;
  int pos_ = kBlock;
  int64_t block_[kBlock];
};

// Rows of 3 (first sentence, end sentence, target) in a malloc'd buffer grown by realloc (large
// blocks move by remapping, not copying); handed to numpy with a capsule that frees it.
template <typename Idx>
class Rows {
 public:
  ~Rows() { std::free(data_); }
  int64_t size() const { return static_cast<int64_t>(len_ / 3); }
  Idx *data() { return data_; }
  void reserve(int64_t rows) {
    if (3 * static_cast<size_t>(rows) <= cap_) return;
    cap_ = 3 * static_cast<size_t>(rows);
    data_ = static_cast<Idx *>(std::realloc(data_, cap_ * sizeof(Idx)));
    if (data_ == nullptr) throw std::bad_alloc();
  }
  void add(int64_t first, int64_t end, int64_t target) {
    if (len_ + 3 > cap_) reserve(std::max<int64_t>(2 * size(), 4096));
    Idx *row = data_ + len_;
    row[0] = static_cast<Idx>(first);
    row[1] = static_cast<Idx>(end);
    row[2] = static_cast<Idx>(target);
    len_ += 3;
  }
  py::array to_numpy() {  // with the GIL held; the array owns the buffer from here on
    const int64_t n = size();
    if (data_ == nullptr) reserve(1);
    Idx *data = data_;
    data_ = nullptr;
    py::capsule owner(data, [](void *p) { std::free(p); });
    return py::array_t<Idx>({n, int64_t{3}}, {3 * sizeof(Idx), sizeof(Idx)}, data, owner);
  }

 private:
  Idx *data_ = nullptr;
  size_t len_ = 0, cap_ = 0;
};

// Fisher-Yates over rows of 3 with Megatron's draws; partners drawn kLookahead steps ahead and
// prefetched (they do not depend on the contents), the swaps in the plain loop's order.
template <typename Idx>
void shuffle_rows(Idx *a, int64_t n, uint64_t seed) {
  constexpr int64_t kLookahead = 32;
  if (n < 2) return;
  std::mt19937_64 gen(seed);
  int64_t ring[kLookahead];
  int64_t next_i = n - 1;
  auto draw = [&](int64_t i) {
    const int64_t j = static_cast<int64_t>(gen() % static_cast<uint64_t>(i + 1));
    ring[i % kLookahead] = j;
    __builtin_prefetch(a + 3 * j, 1);
  };
  for (int64_t k = 0; k < kLookahead && next_i > 0; ++k) draw(next_i--);
  for (int64_t i = n - 1; i > 0; --i) {
    const int64_t j = ring[i % kLookahead];
    if (next_i > 0) draw(next_i--);
    std::swap(a[3 * i], a[3 * j]);
    std::swap(a[3 * i + 1], a[3 * j + 1]);
    std::swap(a[3 * i + 2], a[3 * j + 2]);
  }
}

// Samples of document [first, last) into rows: a sample closes at sentence s when it holds
// >= target tokens and >= min_sentences sentences and s < last - 2 (more than one sentence
// left), else at the document's last sentence.
template <typename Idx>
void walk_document(int64_t first, int64_t last, const int32_t *sizes, int64_t min_sentences,
                   TargetLength &target_length, Rows<Idx> &rows) {
  const int64_t stop = last - 2;
  int64_t start = first;
  int64_t target = target_length.next();
  while (true) {
    int64_t s = start, seq_len = 0, end = last;
    for (const int64_t s_min = std::min(start + min_sentences - 1, stop); s < s_min; ++s)
      seq_len += sizes[s];
    for (; s < stop; ++s) {
      seq_len += sizes[s];
      if (seq_len >= target) {
        end = s + 1;
        break;
      }
    }
    rows.add(start, end, target);
    target = target_length.next();  // also after a document's last sample, as Megatron
    if (end == last) return;
    start = end;
  }
}

template <typename Idx>
py::array build_rows(const int64_t *starts, int64_t num_docs, const int32_t *sizes,
                     int64_t num_samples, int64_t max_len, double short_seq_prob, int64_t seed,
                     int64_t min_sentences, int64_t *stats) {
  Rows<Idx> rows;
  {
    py::gil_scoped_release nogil;
    TargetLength target_length(static_cast<uint32_t>(seed), short_seq_prob, max_len);
    // The first epoch also decides which documents are used (Megatron re-decides it every
    // epoch, with the same answer); each is walked right after its check, from the cache.
    std::vector<std::pair<int64_t, int64_t>> used;
    for (int64_t d = 0; d < num_docs; ++d) {
      const int64_t first = starts[d], last = starts[d + 1], n = last - first;
      stats[kEmpty] += n == 0;
      stats[kOneSentence] += n == 1;
      bool long_sentence = false;
      if (n > 1) {
        for (int64_t s = first; s < last && !long_sentence; ++s)
          long_sentence = sizes[s] > kLongSentenceTokens;
        stats[kLongSentence] += long_sentence;
      }
      if (n < min_sentences) {
        ++stats[kSkippedFew];
      } else if (long_sentence) {
        ++stats[kSkippedLong];
      } else {
        used.emplace_back(first, last);
        if (num_samples != 0) walk_document(first, last, sizes, min_sentences, target_length, rows);
      }
    }
    int64_t epoch = num_samples != 0 && !used.empty();
    if (num_samples > 0 && rows.size() < num_samples)  // room for the epochs still needed
      rows.reserve(num_samples + 2 * rows.size());
    while (epoch > 0 && rows.size() < num_samples) {
      for (const auto &[first, last] : used)
        walk_document(first, last, sizes, min_sentences, target_length, rows);
      ++epoch;
    }
    stats[kEpochs] = epoch;
    // Megatron's seed is a C int: seed + 1 wraps to INT32_MIN for 2^31 - 1 (two's complement,
    // then widened to 64 bits with its sign), which is reproduced; seeds from 2^31 on (which
    // Megatron cannot take) use seed + 1 plainly.
    const uint64_t shuffle_seed = seed == 0x7FFFFFFF ? static_cast<uint64_t>(int64_t{INT32_MIN})
                                                     : static_cast<uint64_t>(seed) + 1;
    shuffle_rows(rows.data(), rows.size(), shuffle_seed);
  }
  return rows.to_numpy();
}

// (rows [S, 3] uint32 or uint64, stats int64 [kNumStats]); see the header for the rules.
py::tuple build_masked_sample_index(CArray<int64_t> document_starts, CArray<int32_t> sizes,
                                    int64_t num_samples, int64_t max_seq_length,
                                    double short_seq_prob, int64_t seed, int64_t min_sentences) {
  const int64_t num_starts = document_starts.size(), num_sizes = sizes.size();
  if (num_starts < 1)
    throw std::invalid_argument("build_masked_sample_index: document_starts must hold >= 1 entry");
  if (max_seq_length < 2 || max_seq_length > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("build_masked_sample_index: max_seq_length must be in [2, 2^31)");
  if (!(short_seq_prob >= 0.0 && short_seq_prob <= 1.0))
    throw std::invalid_argument("build_masked_sample_index: short_seq_prob must be in [0, 1]");
  if (short_seq_prob > 0 && std::round(1.0 / short_seq_prob) > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("build_masked_sample_index: short_seq_prob is below 2^-31 "
                                "(Megatron's ratio 1 / p is a C int); use 0");
  if (seed < 0 || seed > 0xFFFFFFFFLL)
    throw std::invalid_argument("build_masked_sample_index: seed must be in [0, 2^32 - 1]");
  if (min_sentences < 1)
    throw std::invalid_argument("build_masked_sample_index: min_sentences must be >= 1");
  const int64_t *starts = document_starts.data();
  for (int64_t d = 0; d < num_starts; ++d) {
    if (starts[d] < 0 || starts[d] > num_sizes || (d > 0 && starts[d] < starts[d - 1]))
      throw std::invalid_argument("build_masked_sample_index: document_starts must be "
                                  "non-decreasing sentence ids in [0, " +
                                  std::to_string(num_sizes) + "]");
  }
  const int32_t *sz = sizes.data();
  for (int64_t s = num_starts > 0 ? starts[0] : 0; s < starts[num_starts - 1]; ++s)
    if (sz[s] < 0)
      throw std::invalid_argument("build_masked_sample_index: sentence " + std::to_string(s) +
                                  " has a negative length");
  py::array_t<int64_t> stats(kNumStats);
  int64_t *st = stats.mutable_data();
  for (int k = 0; k < kNumStats; ++k) st[k] = 0;
  st[kDocuments] = num_starts - 1;
  py::array rows;
  if (static_cast<uint64_t>(num_sizes) <= std::numeric_limits<uint32_t>::max())
    rows = build_rows<uint32_t>(starts, num_starts - 1, sz, num_samples, max_seq_length,
                                short_seq_prob, seed, min_sentences, st);
  else
    rows = build_rows<uint64_t>(starts, num_starts - 1, sz, num_samples, max_seq_length,
                                short_seq_prob, seed, min_sentences, st);
  return py::make_tuple(rows, stats);
}

}  // namespace

void bind_masked_helpers(py::module_ &m) {
  m.def("build_masked_sample_index", &build_masked_sample_index, py::arg("document_starts"),
        py::arg("sizes"), py::arg("num_samples"), py::arg("max_seq_length"),
        py::arg("short_seq_prob"), py::arg("seed"), py::arg("min_sentences"),
        "(rows [S, 3] of (first sentence, end sentence, target length), uint32 or uint64; "
        "stats int64[7]: documents, empty, one sentence, long sentence, skipped for too few "
        "sentences, skipped for a long sentence, epochs) of the BERT/T5 datasets over the "
        "documents whose sentences start at document_starts[:-1] (see masked_helpers.cpp). "
        "num_samples -1: one epoch.");
}
