# Abseil (Debian 12's libabsl-dev, which gRPC depends on anyway) for the service's locking:
# absl::Mutex, absl::CondVar and the ABSL_GUARDED_BY family of thread-safety annotations in
# coordinator/, process/ and comm/ (docs/ARCHITECTURE.md "Locking").
find_package(absl CONFIG REQUIRED)

# LOOPMOE_THREAD_SAFETY: with Clang, turn the annotations into compile errors (-Wthread-safety
# under our -Werror): a member read without its mutex, a *_locked helper called without it.
# Our code only (LOOPMOE_WARNINGS); scripts/thread_safety_check.sh builds with it.
option(LOOPMOE_THREAD_SAFETY "Check the lock annotations with Clang's -Wthread-safety" OFF)
if(LOOPMOE_THREAD_SAFETY)
  if(CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    list(APPEND LOOPMOE_WARNINGS -Wthread-safety)
  else()
    message(WARNING "LOOPMOE_THREAD_SAFETY needs Clang (this is ${CMAKE_CXX_COMPILER_ID}); "
      "the lock annotations are not checked")
  endif()
endif()
