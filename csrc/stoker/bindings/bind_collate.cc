#include <pybind11/gil_safe_call_once.h>
#if PY_VERSION_HEX < 0x030B0000
#include <longintrepr.h>  // PyLongObject's layout; Python.h includes it from 3.11 on
#endif

#include "stoker/bindings/bindings.h"
#include "stoker/collate/pad.h"
#include "stoker/collate/stack.h"
#include "stoker/common/check.h"
#include "stoker/pool/buffer_pool.h"

namespace stoker::bindings {
namespace {

// What pad_sequences recognises without linking torch: the classes and dtype objects, looked up once, and the
// names of the Tensor attributes it reads, interned.
struct PadTypes {
  py::object tensor, strided, memmap;
  std::vector<std::pair<py::object, DType>> dtypes;
  py::object is_cpu, layout, dtype, shape, stride, data_ptr, is_neg;
};

const PadTypes& pad_types() {
  PYBIND11_CONSTINIT static py::gil_safe_call_once_and_store<PadTypes> storage;
  return storage.call_once_and_store_result([] {
    py::module_ torch = py::module_::import("torch");
    PadTypes t;
    t.tensor = torch.attr("Tensor");
    t.strided = torch.attr("strided");
    t.memmap = py::module_::import("numpy").attr("memmap");
    const std::pair<const char*, DType> table[] = {
        {"bool", {DTypeCode::Bool, 8}},  {"int8", {DTypeCode::Int, 8}},     {"int16", {DTypeCode::Int, 16}},
        {"int32", {DTypeCode::Int, 32}}, {"int64", {DTypeCode::Int, 64}},   {"uint8", {DTypeCode::UInt, 8}},
        {"uint16", {DTypeCode::UInt, 16}}, {"uint32", {DTypeCode::UInt, 32}},  // (not uint64: pad_dtype_supported)
    };
    for (const auto& [name, dt] : table)
      if (py::hasattr(torch, name)) t.dtypes.emplace_back(torch.attr(name), dt);
    auto intern = [](const char* s) { return py::reinterpret_steal<py::object>(PyUnicode_InternFromString(s)); };
    t.is_cpu = intern("is_cpu");
    t.layout = intern("layout");
    t.dtype = intern("dtype");
    t.shape = intern("shape");
    t.stride = intern("stride");
    t.data_ptr = intern("data_ptr");
    t.is_neg = intern("is_neg");
    return t;
  }).get_stored();
}

// A 1-D numpy array (ndarray or memmap, not other subclasses) of a type pad_batch reads, or false.
bool array_sequence(const PadTypes& types, PyObject* o, IntSequence& s) {
  if (Py_TYPE(o) != py::detail::npy_api::get().PyArray_Type_ &&
      Py_TYPE(o) != reinterpret_cast<PyTypeObject*>(types.memmap.ptr()))
    return false;
  auto a = py::reinterpret_borrow<py::array>(o);
  if (a.ndim() != 1) return false;
  const auto dt = dtype_of(a.dtype());
  if (!dt || !pad_dtype_supported(*dt)) return false;
  s.data = static_cast<const uint8_t*>(a.data());
  s.length = static_cast<int64_t>(a.shape(0));
  s.stride = static_cast<int64_t>(a.strides(0));
  s.dtype = *dt;
  return true;
}

// A plain 1-D CPU tensor (exactly torch.Tensor, strided, no negative bit) of a type pad_batch reads, or false.
// Read through seven attributes (no torch headers): about half the cost of Tensor.numpy().
bool tensor_sequence(const PadTypes& types, PyObject* o, IntSequence& s) {
  if (Py_TYPE(o) != reinterpret_cast<PyTypeObject*>(types.tensor.ptr())) return false;
  auto get = [o](const py::object& name) { return py::reinterpret_steal<py::object>(PyObject_GetAttr(o, name.ptr())); };
  auto call = [o](const py::object& name) {
    return py::reinterpret_steal<py::object>(PyObject_CallMethodNoArgs(o, name.ptr()));
  };
  py::object is_cpu = get(types.is_cpu);
  if (is_cpu.ptr() != Py_True) return false;
  py::object layout = get(types.layout);
  if (!layout.is(types.strided)) return false;
  py::object dtype = get(types.dtype);
  const DType* dt = nullptr;
  for (const auto& [obj, code] : types.dtypes)
    if (dtype.is(obj)) dt = &code;
  if (dt == nullptr) return false;
  py::object shape = get(types.shape);
  if (!shape || !PyTuple_Check(shape.ptr()) || PyTuple_GET_SIZE(shape.ptr()) != 1) return false;
  const long long n = PyLong_AsLongLong(PyTuple_GET_ITEM(shape.ptr(), 0));
  if (n < 0) return false;
  py::object neg = call(types.is_neg);
  if (neg.ptr() != Py_False) return false;
  s.length = n;
  s.dtype = *dt;
  if (n == 0) return true;
  py::object strides = call(types.stride);  // stride() is several times cheaper than stride(0)
  py::object ptr = call(types.data_ptr);
  if (!strides || !ptr || !PyTuple_Check(strides.ptr()) || PyTuple_GET_SIZE(strides.ptr()) != 1) return false;
  const long long step = PyLong_AsLongLong(PyTuple_GET_ITEM(strides.ptr(), 0));
  const unsigned long long address = PyLong_AsUnsignedLongLong(ptr.ptr());
  if (PyErr_Occurred() || address == 0) return false;
  s.data = reinterpret_cast<const uint8_t*>(static_cast<uintptr_t>(address));
  s.stride = step * static_cast<int64_t>(dt->itemsize());
  return true;
}

// The value of an exact int of one digit (|v| < 2**30: token ids), read in place as CPython's own inline
// helpers do; false for a larger one. Twice as fast as PyLong_AsLongLongAndOverflow, which is the cost of lists.
inline bool compact_int(PyObject* item, int64_t& value) {
#if PY_VERSION_HEX >= 0x030C0000
  auto* number = reinterpret_cast<PyLongObject*>(item);
  if (!PyUnstable_Long_IsCompact(number)) return false;
  value = static_cast<int64_t>(PyUnstable_Long_CompactValue(number));
  return true;
#else
  const Py_ssize_t size = Py_SIZE(item);
  if (size < -1 || size > 1) return false;
  value = static_cast<int64_t>(size) * static_cast<int64_t>(reinterpret_cast<PyLongObject*>(item)->ob_digit[0]);
  return true;
#endif
}

// The items of a list or tuple of `n` Python ints (int or bool, within int64) into dst; false at anything else.
bool ints_into(PyObject* seq, int64_t n, int64_t* dst) {
  if (PySequence_Fast_GET_SIZE(seq) != n) return false;  // changed since it was measured
  PyObject** items = PySequence_Fast_ITEMS(seq);
  for (int64_t j = 0; j < n; ++j) {
    PyObject* item = items[j];
    if (PyLong_CheckExact(item)) {
      if (compact_int(item, dst[j])) continue;
    } else if (!PyBool_Check(item)) {
      return false;
    }
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(item, &overflow);
    if (overflow) return false;
    dst[j] = v;
  }
  return true;
}

// One pad call's sequences, measured: what pad_batch reads, and where its outputs go.
struct PadInput {
  std::vector<IntSequence> seqs;  // seqs[k * batch + i]: sample i under key k
  std::vector<int64_t> lengths;   // one per sample
  std::vector<py::object> held;   // held[k * batch + i]: the value measured, alive until it is written
  PadLayout layout;
};

// Reads every value of `columns` (see pad_sequences) into `in`. False when a value is of another kind, a
// sample's keys differ in length, the batch is empty or its outputs would not be addressable: the caller's
// own path then decides. Raises only for malformed arguments (not lists, columns of different sizes).
bool measure_columns(const py::list& columns, const std::vector<int64_t>& pad_values, int64_t multiple, bool left,
                     bool mask, PadInput& in) {
  const auto keys = static_cast<int64_t>(columns.size());
  STOKER_CHECK_AS(ValueError, keys >= 1 && static_cast<int64_t>(pad_values.size()) == keys,
                  "pad_sequences: ", keys, " columns for ", pad_values.size(), " pad values");
  int64_t batch = -1;
  for (py::handle column : columns) {
    STOKER_CHECK_AS(TypeError, PyList_CheckExact(column.ptr()), "pad_sequences: each column must be a list");
    const auto n = static_cast<int64_t>(PyList_GET_SIZE(column.ptr()));
    STOKER_CHECK_AS(ValueError, batch < 0 || n == batch, "pad_sequences: columns of ", batch, " and ", n,
                    " samples");
    batch = n;
  }
  if (batch == 0) return false;
  const PadTypes* types = nullptr;  // imported at the first array or tensor
  in.seqs.assign(static_cast<size_t>(keys * batch), IntSequence{});
  in.lengths.assign(static_cast<size_t>(batch), 0);
  in.held.clear();
  in.held.reserve(in.seqs.size());
  for (int64_t k = 0; k < keys; ++k) {
    PyObject* column = PyList_GET_ITEM(columns.ptr(), k);
    for (int64_t i = 0; i < batch; ++i) {
      PyObject* o = PyList_GET_ITEM(column, i);
      IntSequence& s = in.seqs[static_cast<size_t>(k * batch + i)];
      if (PyList_CheckExact(o) || PyTuple_CheckExact(o)) {
        s.length = static_cast<int64_t>(PySequence_Fast_GET_SIZE(o));  // written in place by write_padded
      } else {
        if (types == nullptr) types = &pad_types();
        if (!array_sequence(*types, o, s) && !tensor_sequence(*types, o, s)) {
          PyErr_Clear();  // a tensor attribute may have raised: this value is not ours to judge
          return false;
        }
      }
      in.held.push_back(py::reinterpret_borrow<py::object>(o));
      if (k == 0) {
        in.lengths[static_cast<size_t>(i)] = s.length;
      } else if (s.length != in.lengths[static_cast<size_t>(i)]) {
        return false;
      }
    }
  }
  return PadLayout::make(in.lengths.data(), batch, keys, multiple, left, mask, in.layout);
}

// Pads the values measured (not whatever the columns hold now) into `base` (in.layout.bytes() bytes, 8-byte
// aligned): Python ints with the GIL held, straight into their rows, then the arrays, tensors and padding
// without it. False when a list or tuple holds anything but ints within int64, or changed length since it was
// measured.
bool write_padded(const PadInput& in, const std::vector<int64_t>& pad_values, int64_t* base) {
  const PadLayout& layout = in.layout;
  for (int64_t k = 0; k < layout.keys; ++k) {
    for (int64_t i = 0; i < layout.batch; ++i) {
      const auto at = static_cast<size_t>(k * layout.batch + i);
      const IntSequence& s = in.seqs[at];
      if (s.data == nullptr && s.length > 0 && !ints_into(in.held[at].ptr(), s.length,
                                                          layout.row(base, k, i, s.length)))
        return false;
    }
  }
  ReleaseGil release;
  pad_batch(layout, in.seqs.data(), in.lengths.data(), pad_values.data(), base);
  return true;
}

// The int64 cells of `out`, checked to hold exactly the outputs of `layout`, and `layout`'s stride set to its
// own: a writable, 8-byte aligned numpy int64 array of shape [outputs, batch, width] whose outputs are each
// C-contiguous, in order and apart (a C-contiguous array, or one with gaps between outputs). pad_batch then
// writes cell [k, i, j] of out for each k, i, j and nothing else. Anything else raises TypeError or ValueError.
int64_t* checked_output(const py::object& out, PadLayout& layout) {
  STOKER_CHECK_AS(TypeError, py::isinstance<py::array>(out), "pad_sequences_into: out should be a numpy array, "
                  "got ", std::string(py::str(py::type::handle_of(out).attr("__name__"))));
  auto a = py::reinterpret_borrow<py::array>(out);
  STOKER_CHECK_AS(TypeError, a.dtype().equal(py::dtype::of<int64_t>()), "pad_sequences_into: out should hold "
                  "int64, got dtype ", std::string(py::str(a.dtype())));
  const int64_t want[3] = {layout.outputs(), layout.batch, layout.width};
  bool same_shape = a.ndim() == 3;
  for (int d = 0; same_shape && d < 3; ++d) same_shape = static_cast<int64_t>(a.shape(d)) == want[d];
  if (!same_shape) {
    std::string got;
    for (py::ssize_t d = 0; d < a.ndim(); ++d) got += (d ? ", " : "") + std::to_string(a.shape(d));
    STOKER_CHECK_AS(ValueError, false, "pad_sequences_into: out should have shape (", want[0], ", ", want[1],
                    ", ", want[2], "), got (", got, ")");
  }
  STOKER_CHECK_AS(ValueError, a.writeable(), "pad_sequences_into: out should be writable");
  void* data = a.mutable_data();
  STOKER_CHECK_AS(ValueError, reinterpret_cast<uintptr_t>(data) % alignof(int64_t) == 0,
                  "pad_sequences_into: out should be 8-byte aligned, its data starts at ", data);
  const int64_t cells = layout.batch * layout.width;  // of one output; PadLayout::make checked the product
  if (cells == 0) return static_cast<int64_t*>(data);  // nothing to write: strides do not matter
  const auto s0 = static_cast<int64_t>(a.strides(0)), s1 = static_cast<int64_t>(a.strides(1)),
             s2 = static_cast<int64_t>(a.strides(2));
  const bool rows = s2 == 8 && (layout.batch == 1 || s1 == layout.width * 8);
  const bool apart = layout.outputs() == 1 || (s0 % 8 == 0 && s0 / 8 >= cells);
  STOKER_CHECK_AS(ValueError, rows && apart, "pad_sequences_into: out should hold each output C-contiguous, "
                  "the next at least ", cells * 8, " bytes on; its strides are (", s0, ", ", s1, ", ", s2, ")");
  if (layout.outputs() > 1) layout.stride = s0 / 8;
  return static_cast<int64_t*>(data);
}

}  // namespace

void register_collate(py::module_& m) {
  // Stacks a list of numpy arrays of one shape and dtype into a pooled buffer; returns a dltensor capsule
  // of shape [len(arrays), *shape], or None when the batch is not that regular (the caller then uses
  // torch's own collate, which gives torch's result or torch's error).
  m.def("stack_arrays", [](const py::list& arrays, BufferPool& pool) -> py::object {
    const size_t count = arrays.size();
    if (count == 0) return py::none();
    std::vector<StridedView> views(count);
    std::vector<int64_t> shape;
    py::dtype first_dtype;
    DType dtype;
    for (size_t i = 0; i < count; ++i) {
      py::handle h = arrays[i];
      if (!py::isinstance<py::array>(h)) return py::none();
      auto a = py::reinterpret_borrow<py::array>(h);
      const auto ndim = static_cast<size_t>(a.ndim());
      if (i == 0) {
        auto t = dtype_of(a.dtype());
        if (!t) return py::none();
        dtype = *t;
        first_dtype = a.dtype();
        shape.assign(a.shape(), a.shape() + ndim);
      } else {
        if (ndim != shape.size() || !std::equal(shape.begin(), shape.end(), a.shape())) return py::none();
        if (!a.dtype().equal(first_dtype)) return py::none();
      }
      views[i].data = static_cast<const uint8_t*>(a.data());
      views[i].strides.assign(a.strides(), a.strides() + ndim);
      for (size_t d = 0; d < ndim; ++d)
        if (views[i].strides[d] < 0) return py::none();
    }
    size_t numel = 1;
    for (int64_t d : shape) numel *= static_cast<size_t>(d);
    std::shared_ptr<Block> block;
    {
      ReleaseGil release;  // a page-locked pool may call the driver to allocate
      block = pool.acquire(count * numel * dtype.itemsize());
      stack_views(views, shape, dtype.itemsize(), static_cast<uint8_t*>(block->data));
    }
    std::vector<int64_t> out_shape{static_cast<int64_t>(count)};
    out_shape.insert(out_shape.end(), shape.begin(), shape.end());
    void* data = block->data;
    return to_capsule(export_dlpack(std::move(block), data, dtype, out_shape));
  }, py::arg("arrays"), py::arg("pool"));

  // Pads columns[k][i], sample i's sequence under key k (a list or tuple of ints, a 1-D numpy array or a 1-D
  // CPU tensor of integers or bools), into int64 [B, T] outputs in one pooled block: one capsule per key, then
  // the mask when `mask`. Returns None when any value is something else, or a sample's keys differ in
  // length: the caller's own path then decides (with its result or its error).
  m.def("pad_sequences", [](const py::list& columns, const std::vector<int64_t>& pad_values, int64_t multiple,
                            bool left, bool mask, BufferPool& pool) -> py::object {
    PadInput in;
    if (!measure_columns(columns, pad_values, multiple, left, mask, in)) return py::none();
    std::shared_ptr<Block> block;
    try {
      block = pool.acquire(in.layout.block_bytes());
    } catch (const std::bad_alloc&) {
      return py::none();  // too large: the caller's path raises its own MemoryError
    }
    auto* base = static_cast<int64_t*>(block->data);
    if (!write_padded(in, pad_values, base)) return py::none();
    const DType i64{DTypeCode::Int, 64};
    const std::vector<int64_t> shape{in.layout.batch, in.layout.width};
    py::list out;
    for (int64_t k = 0; k < in.layout.outputs(); ++k)
      out.append(to_capsule(export_dlpack(block, in.layout.output(base, k), i64, shape)));
    return std::move(out);
  }, py::arg("columns"), py::arg("pad_values"), py::arg("multiple"), py::arg("left"), py::arg("mask"),
     py::arg("pool"));

  // pad_sequences into memory of the caller's: once the batch is measured, allocate(outputs, batch, width) is
  // called (once) for a writable, 8-byte aligned int64 numpy array of shape [outputs, B, T] (outputs: the
  // keys, then the mask when `mask`), each output C-contiguous (a C-contiguous array, or one with gaps between
  // outputs, so that each can start where its consumer wants it aligned), and the outputs are written there in
  // that order. Returns
  // True once the array holds them; False where pad_sequences returns None (the array, if allocated, may be
  // partly written) or where allocate returns None (nothing written). An array of another dtype, shape or
  // layout raises: nothing is written outside it. The values measured are the ones written, whatever
  // allocate does to the columns; it must not resize the arrays or tensors they hold.
  m.def("pad_sequences_into", [](const py::list& columns, const std::vector<int64_t>& pad_values, int64_t multiple,
                                 bool left, bool mask, const py::function& allocate) -> bool {
    PadInput in;
    if (!measure_columns(columns, pad_values, multiple, left, mask, in)) return false;
    PadLayout& layout = in.layout;
    py::object out = allocate(layout.outputs(), layout.batch, layout.width);
    if (out.is_none()) return false;
    int64_t* base = checked_output(out, layout);
    return write_padded(in, pad_values, base);
  }, py::arg("columns"), py::arg("pad_values"), py::arg("multiple"), py::arg("left"), py::arg("mask"),
     py::arg("allocate"));
}

}  // namespace stoker::bindings
