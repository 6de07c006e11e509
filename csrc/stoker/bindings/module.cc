#include "stoker/bindings/bindings.h"

PYBIND11_MODULE(_core, m) {
  m.doc() = "stoker's native engine (private: use the stoker package)";
  stoker::bindings::note_main_thread();
  stoker::bindings::register_errors(m);
  stoker::bindings::register_cuda(m);
  stoker::bindings::register_sampler(m);
  stoker::bindings::register_pool(m);
  stoker::bindings::register_pipeline(m);
  stoker::bindings::register_collate(m);
  stoker::bindings::register_packing(m);
}
