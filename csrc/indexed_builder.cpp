// MMIDIDX token-file builder, the write side of megalite/data/indexed.py. Layout (see
// shared/spec/indexed-dataset.md): PREFIX.bin = every sequence's tokens back to back in one dtype;
// PREFIX.idx = 34-byte header, int32 lengths, int64 byte pointers, int64 document index, and int8
// modes for multimodal builds. Little-endian, no padding. It writes to the temporary paths it is
// given; the Python wrapper renames both into place after finalize(); aborted or destroyed before
// finalize() succeeds, it removes the temporaries. Why C++: workers hand over documents one at a
// time, millions of times; each is range-checked and converted straight into an 8 MiB write buffer
// (no per-token syscalls or Python objects), and a merge copies whole .bin files in large blocks.
// Every input check runs before anything is written, so a rejected call leaves the builder
// unchanged and usable; an I/O error leaves it failed (only abort() or destruction remain).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace py = pybind11;

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "MMIDIDX is little-endian; host integers are written as is");

namespace {

constexpr size_t kBufferBytes = size_t(8) << 20;  // write buffer; large blocks keep syscalls rare
constexpr char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr uint64_t kVersion = 1;

// An operating-system error on a named file; translated to Python's OSError(errno, msg, path).
struct FileError : std::runtime_error {
  FileError(int err, std::string path, const std::string &action)
      : std::runtime_error(action + ": " + std::strerror(err)), err(err), path(std::move(path)) {}
  int err;
  std::string path;
};

const char *dtype_name(int code) {
  static const char *names[] = {"?", "uint8", "int8", "int16", "int32", "int64", "float64", "float32", "uint16"};
  return code >= 1 && code <= 8 ? names[code] : "?";
}

// Calls f(T{}) with T the C++ type of MMIDIDX dtype code `code`.
template <typename F>
void dispatch_code(int code, F &&f) {
  switch (code) {
    case 1: f(uint8_t{}); break;   case 2: f(int8_t{}); break;
    case 3: f(int16_t{}); break;   case 4: f(int32_t{}); break;
    case 5: f(int64_t{}); break;   case 6: f(double{}); break;
    case 7: f(float{}); break;     case 8: f(uint16_t{}); break;
    default: throw std::invalid_argument("unknown MMIDIDX dtype code " + std::to_string(code));
  }
}

// Calls f(T{}) with T the C++ integer type of a numpy array's dtype; other dtypes are rejected.
template <typename F>
void dispatch_array(const py::array &a, F &&f) {
  const char kind = a.dtype().kind();
  const auto size = a.itemsize();
  if (kind == 'i' && size == 1) return f(int8_t{});
  if (kind == 'i' && size == 2) return f(int16_t{});
  if (kind == 'i' && size == 4) return f(int32_t{});
  if (kind == 'i' && size == 8) return f(int64_t{});
  if (kind == 'u' && size == 1) return f(uint8_t{});
  if (kind == 'u' && size == 2) return f(uint16_t{});
  if (kind == 'u' && size == 4) return f(uint32_t{});
  if (kind == 'u' && size == 8) return f(uint64_t{});
  throw std::invalid_argument("token ids must be an integer array, got dtype " +
                              std::string(py::str(a.dtype())));
}

// The integers a token dtype holds exactly: its range for integer types; for float types the
// integers a float represents without rounding (|v| <= 2^24 or 2^53).
template <typename Out>
struct Exact {
  static constexpr int64_t lo = std::is_floating_point_v<Out> ? -(int64_t(1) << std::numeric_limits<Out>::digits)
                                                              : int64_t(std::numeric_limits<Out>::min());
  static constexpr uint64_t hi = std::is_floating_point_v<Out> ? uint64_t(1) << std::numeric_limits<Out>::digits
                                                               : uint64_t(std::numeric_limits<Out>::max());
};

template <typename Out, typename In>
inline bool fits(In v) {
  if constexpr (std::is_signed_v<In>) {
    if (v < 0) return int64_t(v) >= Exact<Out>::lo;
  }
  return uint64_t(v) <= Exact<Out>::hi;
}

// Reads through memcpy: numpy data may be unaligned (e.g. the arrays inside a memory-mapped .idx).
template <typename T>
inline T load(const char *p) { T v; std::memcpy(&v, p, sizeof(T)); return v; }

// A write-only file with one large buffer. Owns its descriptor; never throws from the destructor.
class OutFile {
 public:
  explicit OutFile(std::string path) : path_(std::move(path)), buf_(new char[kBufferBytes]) {
    // O_EXCL: the temporary name is ours alone, so removing it later cannot hit someone else's file.
    fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd_ < 0) throw FileError(errno, path_, "cannot create");
  }
  OutFile(const OutFile &) = delete;  // owns a descriptor
  ~OutFile() { close_quietly(); }

  const std::string &path() const { return path_; }
  uint64_t size() const { return flushed_ + used_; }
  // Returns room for at least `min_bytes` (<= kBufferBytes) contiguous bytes in the buffer.
  char *room(size_t min_bytes, size_t *available) {
    if (kBufferBytes - used_ < min_bytes) flush();
    *available = kBufferBytes - used_;
    return buf_.get() + used_;
  }
  void commit(size_t n) { used_ += n; }
  void write(const void *data, size_t n) {
    for (const char *p = static_cast<const char *>(data); n > 0;) {
      size_t k = 0;
      char *dst = room(1, &k);
      k = std::min(k, n);
      std::memcpy(dst, p, k);
      used_ += k, p += k, n -= k;
    }
  }

  void flush() {
    if (used_ == 0) return;
    write_all(buf_.get(), used_);
    flushed_ += used_;
    used_ = 0;
  }

  // Flushes, fsyncs (so the rename that follows publishes complete data) and closes.
  void close() {
    flush();
    if (::fsync(fd_) != 0) throw FileError(errno, path_, "cannot fsync");
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) throw FileError(errno, path_, "cannot close");
  }

  void close_quietly() noexcept { if (fd_ >= 0) ::close(fd_); fd_ = -1; }

 private:
  void write_all(const char *p, size_t n) {
    while (n > 0) {
      const ssize_t w = ::write(fd_, p, n);
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) throw FileError(errno, path_, "cannot write");
      p += w, n -= size_t(w);
    }
  }

  std::string path_;
  std::unique_ptr<char[]> buf_;
  size_t used_ = 0;
  uint64_t flushed_ = 0;
  int fd_ = -1;
};

struct ReadFd {  // closes on every exit path
  explicit ReadFd(const std::string &path) : fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC)) {
    if (fd < 0) throw FileError(errno, path, "cannot open");
  }
  ~ReadFd() { ::close(fd); }
  int fd;
};

class IndexedDatasetBuilder {
 public:
  IndexedDatasetBuilder(std::string bin_path, std::string idx_path, int dtype_code, bool multimodal)
      : idx_path_(std::move(idx_path)), code_(dtype_code), multimodal_(multimodal) {
    dispatch_code(code_, [&](auto t) { itemsize_ = sizeof(t); });
    bin_ = std::make_unique<OutFile>(std::move(bin_path));
    document_indices_.push_back(0);
  }
  ~IndexedDatasetBuilder() { abort(); }

  // One sequence (sentence); the current document stays open.
  void add_item(const py::array &tokens, int mode) {
    require_open();
    const py::ssize_t n = check_tokens(tokens);
    const int64_t length = n;
    check_lengths(&length, 1, n);
    check_mode(mode);
    write_tokens(tokens);
    lengths_.push_back(int32_t(n));
    tokens_ += uint64_t(n);
    if (multimodal_) modes_.push_back(int8_t(mode));
  }

  // A whole document, ended here: its tokens split into sequences of `lengths` (which must sum to
  // the token count; None = one sequence); `modes` is one int for all sequences or one per sequence.
  void add_document(const py::array &tokens, const std::optional<std::vector<int64_t>> &lengths_arg,
                    const py::object &modes_arg) {
    require_open();
    const py::ssize_t n = check_tokens(tokens);
    const std::vector<int64_t> lengths = lengths_arg ? *lengths_arg : std::vector<int64_t>{int64_t(n)};
    check_lengths(lengths.data(), lengths.size(), n);
    std::vector<int> modes;
    if (py::isinstance<py::int_>(modes_arg)) {
      modes.assign(lengths.size(), modes_arg.cast<int>());
    } else {
      modes = modes_arg.cast<std::vector<int>>();
      if (modes.size() != lengths.size())
        throw std::invalid_argument("got " + std::to_string(modes.size()) + " modes for " +
                                    std::to_string(lengths.size()) + " sentences (give one, or one per sentence)");
    }
    for (int m : modes) check_mode(m);
    write_tokens(tokens);
    lengths_.insert(lengths_.end(), lengths.begin(), lengths.end());
    tokens_ += uint64_t(n);
    if (multimodal_) modes_.insert(modes_.end(), modes.begin(), modes.end());
    end_document();
  }

  // Many whole documents in one call (one sequence each): `tokens` is their concatenation and
  // `lengths` their sizes. Saves the per-call overhead when a tokenizer hands over a batch.
  void add_documents(const py::array &tokens, const py::array_t<int64_t, py::array::c_style> &lengths_arg,
                     int mode) {
    require_open();
    if (document_open())
      throw std::invalid_argument("add_documents: the current document is still open; call end_document() first");
    const py::ssize_t n = check_tokens(tokens);
    if (lengths_arg.ndim() != 1) throw std::invalid_argument("document lengths must be 1-D");
    const int64_t *lengths = lengths_arg.data();
    const size_t k = size_t(lengths_arg.size());
    check_lengths(lengths, k, n);
    check_mode(mode);
    write_tokens(tokens);
    lengths_.insert(lengths_.end(), lengths, lengths + k);
    tokens_ += uint64_t(n);
    if (multimodal_) modes_.insert(modes_.end(), k, int8_t(mode));
    for (size_t i = 0, first = lengths_.size() - k; i < k; ++i)
      document_indices_.push_back(int64_t(first + i + 1));
  }

  void end_document() {
    require_open();
    document_indices_.push_back(int64_t(lengths_.size()));
  }

  // Appends a whole existing dataset: its .bin bytes by buffered copy, its lengths as they are,
  // its document index shifted by the sequences already written (pointers are recomputed in
  // finalize). The caller has validated the dataset; the cheap invariants are checked again here.
  void add_index(const std::string &src_bin, const py::array &lengths, const py::array &document_indices,
                 const py::object &modes) {
    require_open();
    if (document_open())
      throw std::invalid_argument("add_index: the current document is still open; call end_document() first");
    const char *len_p = array_data(lengths, 'i', 4, "sequence lengths");
    const char *doc_p = array_data(document_indices, 'i', 8, "document indices");
    const py::ssize_t n = lengths.size(), d = document_indices.size();
    if (d < 1 || load<int64_t>(doc_p) != 0 || load<int64_t>(doc_p + 8 * (d - 1)) != n)
      throw std::invalid_argument("add_index: document index of " + src_bin + " must run from 0 to " +
                                  std::to_string(n));
    const char *mode_p = nullptr;
    if (multimodal_ == modes.is_none())
      throw std::invalid_argument("add_index: modes must be given exactly when the builder is multimodal");
    if (multimodal_) {
      py::array m = modes.cast<py::array>();
      mode_p = array_data(m, 'i', 1, "modes");
      if (m.size() != n) throw std::invalid_argument("add_index: modes of " + src_bin + " do not match its sequences");
    }
    uint64_t tokens = 0;
    for (py::ssize_t i = 0; i < n; ++i) {
      const int32_t l = load<int32_t>(len_p + 4 * i);
      if (l < 0) throw std::invalid_argument("add_index: negative sequence length in " + src_bin);
      tokens += uint64_t(l);
    }

    failed_ = true;  // from here on a failure leaves a partial copy behind
    copy_file(src_bin, tokens * itemsize_);
    const size_t old = lengths_.size();
    lengths_.resize(old + size_t(n));
    if (n > 0) std::memcpy(lengths_.data() + old, len_p, size_t(n) * 4);
    if (multimodal_) {
      modes_.resize(old + size_t(n));
      if (n > 0) std::memcpy(modes_.data() + old, mode_p, size_t(n));
    }
    document_indices_.reserve(document_indices_.size() + size_t(d) - 1);
    for (py::ssize_t i = 1; i < d; ++i) document_indices_.push_back(int64_t(old) + load<int64_t>(doc_p + 8 * i));
    tokens_ += tokens;
    failed_ = false;
  }

  // Closes an open document, writes the .idx and syncs both temporaries. Renaming is the caller's.
  void finalize() {
    require_open();
    if (document_open()) end_document();
    failed_ = true;
    const uint64_t expected_bytes = num_tokens() * itemsize_;
    bin_->close();
    if (bin_->size() != expected_bytes)  // an internal invariant; cheap to keep honest
      throw std::runtime_error("internal error: .bin has " + std::to_string(bin_->size()) + " bytes, expected " +
                               std::to_string(expected_bytes));
    idx_ = std::make_unique<OutFile>(idx_path_);
    OutFile &f = *idx_;
    const uint8_t code = uint8_t(code_);
    const uint64_t n = lengths_.size(), d = document_indices_.size();
    char header[34];  // magic, u64 version, u8 dtype code, u64 sequence_count, u64 document_count
    std::memcpy(header, kMagic, 9), std::memcpy(header + 9, &kVersion, 8), std::memcpy(header + 17, &code, 1);
    std::memcpy(header + 18, &n, 8), std::memcpy(header + 26, &d, 8);
    f.write(header, sizeof(header));
    f.write(lengths_.data(), n * 4);
    for (int64_t i = 0, pointer = 0; i < int64_t(n); pointer += int64_t(lengths_[i++]) * int64_t(itemsize_))
      f.write(&pointer, 8);  // pointers: the running sum of length x itemsize
    f.write(document_indices_.data(), d * 8);
    if (multimodal_) f.write(modes_.data(), n);
    f.close();
    failed_ = false;
    finalized_ = true;
  }

  // Removes the temporaries unless finalize() succeeded. Safe to call repeatedly. A forked child's
  // copy only closes its descriptors: the files belong to the process that created them.
  void abort() noexcept {
    if (finalized_ || aborted_) return;
    aborted_ = true;
    for (OutFile *f : {bin_.get(), idx_.get()}) {
      if (f) f->close_quietly();
      if (f && ::getpid() == owner_) ::unlink(f->path().c_str());
    }
  }

  uint64_t sequence_count() const { return lengths_.size(); }
  uint64_t document_count() const { return document_indices_.size() - 1; }
  uint64_t num_tokens() const { return tokens_; }
  bool document_open() const { return int64_t(lengths_.size()) != document_indices_.back(); }

 private:
  void require_open() const {
    if (finalized_) throw std::runtime_error("the builder is already finalized");
    if (aborted_) throw std::runtime_error("the builder was aborted");
    if (failed_) throw std::runtime_error("an earlier write failed; abort() this builder");
    if (::getpid() != owner_) throw std::runtime_error("this builder belongs to the process that created it");
  }

  void check_mode(int mode) const {  // int8, and 0 unless multimodal
    if (!multimodal_ && mode != 0)
      throw std::invalid_argument("mode " + std::to_string(mode) + " given to a builder that is not multimodal");
    if (mode < std::numeric_limits<int8_t>::min() || mode > std::numeric_limits<int8_t>::max())
      throw std::invalid_argument("mode " + std::to_string(mode) + " does not fit int8");
  }

  // Sequence lengths must fit the int32 length field and add up to the `n` tokens given.
  static void check_lengths(const int64_t *lengths, size_t count, py::ssize_t n) {
    int64_t total = 0;
    for (size_t i = 0; i < count; ++i) {
      if (lengths[i] < 0 || lengths[i] > std::numeric_limits<int32_t>::max())
        throw std::invalid_argument("sequence length " + std::to_string(lengths[i]) + " (sequence " +
                                    std::to_string(i) + " of this call) is not in [0, 2^31)");
      total += lengths[i];
    }
    if (total != n)
      throw std::invalid_argument("sequence lengths sum to " + std::to_string(total) + " but " +
                                  std::to_string(n) + " tokens were given");
  }

  static const char *array_data(const py::array &a, char kind, py::ssize_t itemsize, const char *what) {
    if (a.ndim() != 1 || a.dtype().kind() != kind || a.itemsize() != itemsize || !(a.flags() & py::array::c_style))
      throw std::invalid_argument(std::string(what) + " must be a contiguous 1-D array of " + kind +
                                  std::to_string(itemsize * 8));
    return static_cast<const char *>(a.data());
  }

  // Validates a token array (1-D, contiguous, integer, every value fits the dtype); returns its length.
  py::ssize_t check_tokens(const py::array &tokens) const {
    if (tokens.ndim() != 1)
      throw std::invalid_argument("tokens must be a 1-D array, got " + std::to_string(tokens.ndim()) + " dimensions");
    if (!(tokens.flags() & py::array::c_style)) throw std::invalid_argument("tokens must be a contiguous array");
    const py::ssize_t n = tokens.size();
    const char *p = static_cast<const char *>(tokens.data());
    dispatch_array(tokens, [&](auto in) {
      using In = decltype(in);
      dispatch_code(code_, [&](auto out) {
        using Out = decltype(out);
        for (py::ssize_t i = 0; i < n; ++i) {
          const In v = load<In>(p + i * sizeof(In));
          if (!fits<Out>(v))
            throw std::invalid_argument("token id " + std::to_string(v) + " (position " + std::to_string(i) +
                                        ") does not fit the dataset dtype " + dtype_name(code_) + " [" +
                                        std::to_string(Exact<Out>::lo) + ", " + std::to_string(Exact<Out>::hi) + "]");
        }
      });
    });
    return n;
  }

  // Converts checked tokens to the dataset dtype straight into the write buffer.
  void write_tokens(const py::array &tokens) {
    const char *src = static_cast<const char *>(tokens.data());
    const size_t n = size_t(tokens.size());
    failed_ = true;
    dispatch_array(tokens, [&](auto in) {
      using In = decltype(in);
      dispatch_code(code_, [&](auto out) {
        using Out = decltype(out);
        for (size_t i = 0; i < n;) {
          size_t room = 0;
          char *dst = bin_->room(sizeof(Out), &room);
          const size_t k = std::min(n - i, room / sizeof(Out));
          for (size_t j = 0; j < k; ++j) {
            const Out v = static_cast<Out>(load<In>(src + (i + j) * sizeof(In)));
            std::memcpy(dst + j * sizeof(Out), &v, sizeof(Out));
          }
          bin_->commit(k * sizeof(Out));
          i += k;
        }
      });
    });
    failed_ = false;
  }

  void copy_file(const std::string &src, uint64_t expected) {
    ReadFd in(src);
    uint64_t copied = 0;
    while (copied <= expected) {
      size_t room = 0;
      char *dst = bin_->room(kBufferBytes, &room);  // flushes: reads go straight into the empty buffer
      const ssize_t r = ::read(in.fd, dst, room);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) throw FileError(errno, src, "cannot read");
      if (r == 0) break;
      bin_->commit(size_t(r));
      copied += uint64_t(r);
    }
    if (copied != expected)
      throw std::invalid_argument(src + " changed while it was copied: expected " + std::to_string(expected) +
                                  " bytes, read " + std::to_string(copied));
  }

  std::unique_ptr<OutFile> bin_, idx_;
  std::string idx_path_;
  int code_;
  size_t itemsize_ = 0;
  bool multimodal_;
  std::vector<int32_t> lengths_;
  std::vector<int64_t> document_indices_;
  std::vector<int8_t> modes_;
  uint64_t tokens_ = 0;
  bool finalized_ = false, aborted_ = false, failed_ = false;
  const pid_t owner_ = ::getpid();
};

}  // namespace

void bind_indexed_builder(py::module_ &m) {
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const FileError &e) {
      // OSError(errno, message, filename) so Python sees .errno and .filename as usual.
      py::object err = py::reinterpret_steal<py::object>(
          PyObject_CallFunction(PyExc_OSError, "iss", e.err, e.what(), e.path.c_str()));
      if (err) PyErr_SetObject(PyExc_OSError, err.ptr());
    }
  });

  py::class_<IndexedDatasetBuilder>(m, "IndexedDatasetBuilder", R"doc(
Writes one MMIDIDX dataset to temporary files (bin_path, idx_path) that the caller renames after
finalize(); abort() or destruction before that removes them. Tokens: 1-D contiguous integer arrays,
range-checked before anything is written (ValueError names value and position). Not thread-safe.)doc")
      .def(py::init<std::string, std::string, int, bool>(), py::arg("bin_path"), py::arg("idx_path"),
           py::arg("dtype_code"), py::arg("multimodal") = false,
           "Creates bin_path (which must not exist); idx_path is created by finalize().")
      .def("add_item", &IndexedDatasetBuilder::add_item, py::arg("tokens"), py::arg("mode") = 0,
           "Appends one sequence; the current document stays open.")
      .def("add_document", &IndexedDatasetBuilder::add_document, py::arg("tokens"), py::arg("lengths") = py::none(),
           py::arg("modes") = 0,
           "Appends a document split into sequences of `lengths` tokens (summing to len(tokens); None: one "
           "sequence) and ends it. `modes`: one int for every sequence, or a list with one per sequence.")
      .def("add_documents", &IndexedDatasetBuilder::add_documents, py::arg("tokens"), py::arg("lengths"),
           py::arg("mode") = 0,
           "Appends len(lengths) whole documents (one sequence each) whose concatenation is `tokens`.")
      .def("end_document", &IndexedDatasetBuilder::end_document, "Ends the current document.")
      .def("add_index", &IndexedDatasetBuilder::add_index, py::arg("bin_path"), py::arg("sequence_lengths"),
           py::arg("document_indices"), py::arg("modes") = py::none(),
           "Appends an existing dataset: copies bin_path, appends its int32 lengths, its int64 document "
           "index shifted, and its int8 modes (multimodal builders only).")
      .def("finalize", &IndexedDatasetBuilder::finalize, "Ends an open document, writes the .idx, fsyncs both.")
      .def("abort", &IndexedDatasetBuilder::abort, "Removes the temporaries unless finalized.")
      .def_property_readonly("sequence_count", &IndexedDatasetBuilder::sequence_count)
      .def_property_readonly("document_count", &IndexedDatasetBuilder::document_count)  // ended so far
      .def_property_readonly("num_tokens", &IndexedDatasetBuilder::num_tokens)
      .def_property_readonly("document_open", &IndexedDatasetBuilder::document_open,
                             "Whether sequences were added since the last document ended.");
}
