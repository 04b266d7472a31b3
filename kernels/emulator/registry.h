// The kernels of one emulated library, by name: kernels/emulated.py compiles each kernels/<layer>.cu
// together with a line EMULATED_KERNEL(name) per `extern "C" __global__` function it finds, and
// runtime.cpp's emulated_launch looks them up here. Each entry records what the kernel's
// parameters are (size, and pointer, integer or float), so that a launch whose arguments do not
// match is refused, where the device would misread them silently.
#pragma once
#include <string.h>

#include <type_traits>
#include <utility>
#include <vector>

namespace emulated {

constexpr int MAX_ARGS = 32;

struct KernelInfo {
    const char* name;
    void* function;
    void (*call)(void* function, void** args);  // function(*args[0], *args[1], ...) with its own types
    int nargs;
    int sizes[MAX_ARGS];
    char kinds[MAX_ARGS];  // 'p' pointer, 'i' integer, 'f' floating point
};

inline std::vector<const KernelInfo*>& registry() {
    static std::vector<const KernelInfo*> kernels;
    return kernels;
}

inline const KernelInfo* find_kernel(const char* name) {
    for (const KernelInfo* k : registry())
        if (strcmp(k->name, name) == 0) return k;
    return nullptr;
}

template <class T>
constexpr char kind_of() {
    return std::is_pointer<T>::value ? 'p' : std::is_floating_point<T>::value ? 'f' : 'i';
}

template <class... Args, size_t... I>
void call_with(void (*f)(Args...), void** args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_reference_t<Args>*>(args[I])...);
}

template <class... Args>
struct Registration {
    KernelInfo info;
    Registration(const char* name, void (*f)(Args...)) {
        static_assert(sizeof...(Args) <= MAX_ARGS, "too many kernel parameters");
        info.name = name;
        info.function = reinterpret_cast<void*>(f);
        info.call = [](void* function, void** args) {
            call_with(reinterpret_cast<void (*)(Args...)>(function), args, std::index_sequence_for<Args...>());
        };
        info.nargs = sizeof...(Args);
        const int sizes[] = {int(sizeof(Args))..., 0};
        const char kinds[] = {kind_of<Args>()..., 0};
        for (int i = 0; i < info.nargs; i++) {
            info.sizes[i] = sizes[i];
            info.kinds[i] = kinds[i];
        }
        registry().push_back(&info);
    }
};

}  // namespace emulated

#define EMULATED_KERNEL(name) static emulated::Registration registration_##name(#name, &name);
