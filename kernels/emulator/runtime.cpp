// The emulated device's runtime: a grid launch runs its blocks one at a time, each block's threads
// as fibers (cuda_on_cpu.h says what that models and what it does not). Compiled into every
// kernels/<layer>.cu's host library (kernels/emulated.py), with the kernels registered by
// EMULATED_KERNEL (registry.h) and reached from Python through emulated_launch.
//
// Scheduling: a block's threads start in a shuffled order, each running until it reaches a
// synchronization point or returns; whatever those points release (a barrier all live threads
// reached, a collective all 32 lanes of a warp reached) runs in a later round, again shuffled, each
// thread until its next point; which warps run in a round is drawn (pick_round), so warps drift
// apart. Every barrier and collective checks that the threads meeting there may (a warp's lanes
// all at the same one), so a kernel that would hang or be undefined on the device is reported with
// where it went wrong. The shuffles come from a seed the caller passes with each launch, so a run
// repeats.
//
// Fibers: a fiber takes threads that have not started yet, one after another, and runs each on its
// own stack; a thread that stops at a synchronization point keeps that fiber until it returns, and
// the next fiber takes over the unstarted threads. So a kernel that never synchronizes runs all of
// a block on one fiber, with no switch per thread, and one that does gets a fiber per thread.
#include <stdarg.h>
#include <stdio.h>
#include <sys/mman.h>

#include <string>
#include <vector>

#include "cuda_on_cpu.h"
#include "registry.h"

#if !defined(__x86_64__)
#error "the emulated device's thread switch (emulated_switch below) is written for x86-64 only"
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

// Weak: a library whose kernels use no shared memory has no such section, and these are null.
extern "C" char __start_emulated_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_emulated_shared[] __attribute__((weak, visibility("hidden")));

// Save the callee-saved registers on the current stack, store its pointer in *save_sp, load
// new_sp and restore the registers saved there: a switch between fibers in a few nanoseconds (the
// C library's swapcontext costs a system call each time). A fresh fiber's stack is laid out by
// start_fiber below so that the final `ret` enters fiber_main.
extern "C" void emulated_switch(void** save_sp, void* new_sp);
asm(R"(
    .text
    .globl emulated_switch
    .hidden emulated_switch
    .type emulated_switch, @function
emulated_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emulated_switch, .-emulated_switch
)");

namespace emulated {

uint3 thread_idx, block_idx;
dim3 block_dim, grid_dim;

namespace {

constexpr size_t STACK_BYTES = 256 * 1024;  // per fiber; the sanitizer's frames are several times larger
constexpr size_t GUARD_BYTES = 4096;        // an unmapped page under each stack: an overflow faults

enum class State { unstarted, running, at_barrier, at_warp, exited };
enum class Collective { none, shuffle_xor, mma };
const char* collective_name(Collective c) { return c == Collective::mma ? "mma.sync" : "__shfl_xor_sync"; }

struct Thread {
    uint3 idx{};
    int warp = 0, lane = 0;
    State state = State::unstarted;
    int fiber = -1;  // the fiber it runs on, once started
};

struct Fiber {
    void* sp = nullptr;
    char* stack = nullptr;  // lowest usable address
    void* asan_fake_stack = nullptr;
};

struct Warp {
    int live = 0;     // lanes that exist and have not returned
    int arrived = 0;  // lanes waiting at the current collective
    Collective op = Collective::none;
    int lane_mask = 0;
    uint32_t in[32][10];  // each lane's operands: a value, or mma's a[4], b[2] and c[4] (as bits)
    uint64_t out[32][2];  // each lane's result: a value, or mma's d[4] (as fp32 pairs)
};

struct Launch {
    const KernelInfo* kernel = nullptr;
    void** args = nullptr;
    std::vector<Thread> threads;
    std::vector<Fiber> fibers;
    std::vector<int> idle;            // fibers free to take unstarted threads
    std::vector<int> unstarted;       // threads not yet started, in the order they start
    size_t started = 0;               // how many of `unstarted` have
    std::vector<Warp> warps;
    std::vector<int> round, next;     // threads to resume in this round, and released for a later one
    size_t round_pos = 0;             // how many of `round` have had their turn
    std::vector<int8_t> coins;        // pick_round's, per warp
    int live = 0, at_barrier = 0;
    Thread* current = nullptr;        // the thread running now, and its fiber
    Fiber* fiber = nullptr;
    void* scheduler_sp = nullptr;
    const void* scheduler_stack_bottom = nullptr;
    size_t scheduler_stack_size = 0;
    uint64_t rng = 0;
    std::string error;
};

Launch launch;
char* stacks = nullptr;  // one region for every fiber's stack, kept between launches
int stacks_for = 0;

uint64_t next_random() {  // splitmix64
    uint64_t z = (launch.rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

template <class T>
void shuffle(std::vector<T>& v) {  // Fisher-Yates, with a multiply-shift in place of a division
    for (size_t i = v.size(); i > 1; i--) std::swap(v[i - 1], v[(unsigned __int128)next_random() * i >> 64]);
}

// ------------------------------------------------------------------------------ switching

// From the scheduler into fiber f; returns when the scheduler is switched back to, which happens
// once every thread of the round has had its turn (fibers hand over to each other, below).
void enter(int f) {
    Fiber& fiber = launch.fibers[f];
    launch.fiber = &fiber;
#if defined(__SANITIZE_ADDRESS__)
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, fiber.stack, STACK_BYTES);
    emulated_switch(&launch.scheduler_sp, fiber.sp);
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
    emulated_switch(&launch.scheduler_sp, fiber.sp);
#endif
    launch.fiber = nullptr;
    launch.current = nullptr;
}

// From the running fiber to what runs next: the next thread of this round, directly, or else the
// scheduler. Returns when something switches back to this fiber (never, if for_good).
void switch_away(bool for_good) {
    Fiber& from = *launch.fiber;
    void* to_sp = launch.scheduler_sp;
    const void* to_stack = launch.scheduler_stack_bottom;
    size_t to_size = launch.scheduler_stack_size;
    if (launch.error.empty() && launch.round_pos < launch.round.size()) {
        Thread& t = launch.threads[launch.round[launch.round_pos++]];
        Fiber& to = launch.fibers[t.fiber];
        launch.current = &t;
        launch.fiber = &to;
        thread_idx = t.idx;
        to_sp = to.sp;
        to_stack = to.stack;
        to_size = STACK_BYTES;
    }
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_start_switch_fiber(for_good ? nullptr : &from.asan_fake_stack, to_stack, to_size);
    emulated_switch(&from.sp, to_sp);
    __sanitizer_finish_switch_fiber(from.asan_fake_stack, nullptr, nullptr);
#else
    (void)for_good, (void)to_stack, (void)to_size;
    emulated_switch(&from.sp, to_sp);
#endif
}

// The running thread stops here until its turn in a later round (it has been put in `next`, or
// will be); whoever switches back to its fiber has made it the current thread again.
void wait() { switch_away(false); }

[[noreturn]] void fail(const char* format, ...) {
    char message[512];
    va_list ap;
    va_start(ap, format);
    vsnprintf(message, sizeof message, format, ap);
    va_end(ap);
    if (launch.error.empty()) {
        const Thread& t = *launch.current;
        char where[160];
        snprintf(where, sizeof where, "%s, block (%u, %u, %u), thread (%u, %u, %u): ", launch.kernel->name,
                 block_idx.x, block_idx.y, block_idx.z, t.idx.x, t.idx.y, t.idx.z);
        launch.error = std::string(where) + message;
    }
    for (;;) switch_away(true);  // to the scheduler, which sees the error and never comes back
}

void release_barrier() {
    for (size_t i = 0; i < launch.threads.size(); i++)
        if (launch.threads[i].state == State::at_barrier) {
            launch.threads[i].state = State::running;
            launch.next.push_back(int(i));
        }
    launch.at_barrier = 0;
}

void thread_exits(Thread& t) {
    t.state = State::exited;
    launch.live--;
    Warp& w = launch.warps[t.warp];
    w.live--;
    if (w.arrived > 0) fail("returned while other lanes of its warp wait at %s", collective_name(w.op));
    if (launch.at_barrier > 0 && launch.at_barrier == launch.live) release_barrier();
}

// A fiber's life: run unstarted threads one after another; when none is left, go idle.
extern "C" void fiber_main() {
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(nullptr, &launch.scheduler_stack_bottom, &launch.scheduler_stack_size);
#endif
    const int f = int(launch.fiber - launch.fibers.data());
    while (launch.started < launch.unstarted.size()) {
        Thread& t = launch.threads[launch.unstarted[launch.started++]];
        t.state = State::running;
        t.fiber = f;
        launch.current = &t;
        thread_idx = t.idx;
        launch.kernel->call(launch.kernel->function, launch.args);
        thread_exits(*launch.current);
    }
    launch.idle.push_back(f);
    for (;;) switch_away(true);
}

void start_fiber(Fiber& f) {
    // From the top down: a zero where fiber_main's caller's return address would be (so that it
    // is entered with the stack aligned as after a call), fiber_main's address for
    // emulated_switch's `ret`, then six zeros for the registers it pops.
    void** top = reinterpret_cast<void**>(f.stack + STACK_BYTES);
    *--top = nullptr;
    *--top = reinterpret_cast<void*>(&fiber_main);
    for (int i = 0; i < 6; i++) *--top = nullptr;
    f.sp = top;
}

bool reserve_stacks(int fibers) {
    if (fibers <= stacks_for) return true;
    if (stacks != nullptr) munmap(stacks, stacks_for * (STACK_BYTES + GUARD_BYTES));
    const size_t bytes = fibers * (STACK_BYTES + GUARD_BYTES);
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        stacks = nullptr;
        stacks_for = 0;
        return false;
    }
    stacks = static_cast<char*>(p);
    stacks_for = fibers;
    for (int i = 0; i < fibers; i++) mprotect(stacks + i * (STACK_BYTES + GUARD_BYTES), GUARD_BYTES, PROT_NONE);
    return true;
}

// ------------------------------------------------------------------------------ one block

// No thread can run and some wait: the checks at every barrier and collective make this
// unreachable for any kernel, so reaching it is the emulator's own error, reported in full.
void deadlock(uint3 block) {
    std::string waits;
    for (const Thread& t : launch.threads) {
        if (t.state == State::exited || waits.size() > 300) continue;
        char one[96];
        snprintf(one, sizeof one, "%s(%u,%u,%u) at %s", waits.empty() ? "" : ", ", t.idx.x, t.idx.y, t.idx.z,
                 t.state == State::at_barrier ? "__syncthreads" : collective_name(launch.warps[t.warp].op));
        waits += one;
    }
    char head[128];
    snprintf(head, sizeof head, "%s, block (%u, %u, %u): deadlock: ", launch.kernel->name, block.x, block.y, block.z);
    launch.error = std::string(head) + "threads wait where the others never come: " + waits;
}

// The threads to resume in this round: each warp's released threads run now or wait for a later
// round, on a coin toss per warp (and at least one warp runs), so that warps drift apart by many
// synchronization points, as on the device, where they run at their own pace. Without that, every
// warp would pass one collective per round in step with the others, hiding a missing barrier.
void pick_round() {
    std::vector<int8_t>& coin = launch.coins;
    coin.assign(launch.warps.size(), -1);
    launch.round.clear();
    size_t kept = 0;
    for (int t : launch.next) {
        int8_t& c = coin[launch.threads[t].warp];
        if (c < 0) c = int8_t(next_random() & 1);
        if (c) launch.round.push_back(t);
        else launch.next[kept++] = t;
    }
    launch.next.resize(kept);
    if (launch.round.empty()) launch.round.swap(launch.next);
    shuffle(launch.round);
}

void run_block(uint3 block) {
    block_idx = block;
    if (__start_emulated_shared != nullptr) memset(__start_emulated_shared, 0xff, __stop_emulated_shared - __start_emulated_shared);
    const int threads = int(launch.threads.size());
    for (int i = 0; i < threads; i++) {
        Thread& t = launch.threads[i];
        t.state = State::unstarted;
        t.fiber = -1;
        launch.unstarted[i] = i;
    }
    shuffle(launch.unstarted);
    launch.started = 0;
    launch.idle.clear();
    for (int f = int(launch.fibers.size()) - 1; f >= 0; f--) launch.idle.push_back(f);
    for (Warp& w : launch.warps) {
        w.live = w.arrived = 0;
        w.op = Collective::none;
    }
    for (const Thread& t : launch.threads) launch.warps[t.warp].live++;
    launch.live = threads;
    launch.at_barrier = 0;
    launch.round.clear();
    launch.round_pos = 0;
    launch.next.clear();
    while (launch.started < launch.unstarted.size()) {  // every thread starts, on as few fibers as it takes
        const int f = launch.idle.back();
        launch.idle.pop_back();
        start_fiber(launch.fibers[f]);
        enter(f);
        if (!launch.error.empty()) return;
    }
    while (launch.live > 0) {
        if (launch.next.empty()) return deadlock(block);
        pick_round();
        Thread& first = launch.threads[launch.round[0]];
        launch.round_pos = 1;
        launch.current = &first;
        thread_idx = first.idx;
        enter(first.fiber);  // the round's threads hand over to each other, the last one back here
        if (!launch.error.empty()) return;
    }
}

// A lane's arrival at a warp collective, its operands already in w.in[lane]. Returns true for
// the 32nd lane, which then computes every lane's result into w.out while the others wait; every
// lane, the last included, then waits, and all 32 go on together in the next round.
bool arrive(Collective op, unsigned mask, int lane_mask) {
    Thread& t = *launch.current;
    Warp& w = launch.warps[t.warp];
    if (mask != 0xffffffffu) fail("%s with mask %#x: only full-warp collectives are emulated", collective_name(op), mask);
    if (w.live != 32) fail("%s in a warp of %d live lanes: all 32 must take part", collective_name(op), w.live);
    if (w.arrived == 0) {
        for (int l = 0; l < 32; l++)
            if (launch.threads[t.warp * 32 + l].state == State::at_barrier)
                fail("%s while lane %d of its warp waits at __syncthreads", collective_name(op), l);
        w.op = op;
        w.lane_mask = lane_mask;
    } else if (w.op != op || w.lane_mask != lane_mask) {
        fail("meets its warp at %s (lane mask %d) while other lanes wait at %s (lane mask %d)", collective_name(op),
             lane_mask, collective_name(w.op), w.lane_mask);
    }
    t.state = State::at_warp;
    if (++w.arrived < 32) return false;
    w.arrived = 0;
    for (int l = 0; l < 32; l++) {
        launch.threads[t.warp * 32 + l].state = State::running;
        launch.next.push_back(t.warp * 32 + l);
    }
    return true;
}

}  // namespace

// ------------------------------------------------------------------------------ what the kernels call

void syncthreads() {
    Thread& t = *launch.current;
    if (launch.warps[t.warp].arrived > 0)
        fail("__syncthreads while other lanes of its warp wait at %s", collective_name(launch.warps[t.warp].op));
    t.state = State::at_barrier;
    if (++launch.at_barrier == launch.live) release_barrier();
    wait();
}

uint64_t shuffle_xor(unsigned mask, uint64_t value, int lane_mask, int width) {
    if (width != 32) fail("__shfl_xor_sync with width %d: only 32 is emulated", width);
    Thread& t = *launch.current;
    Warp& w = launch.warps[t.warp];
    memcpy(w.in[t.lane], &value, 8);
    if (arrive(Collective::shuffle_xor, mask, lane_mask))
        for (int l = 0; l < 32; l++) memcpy(w.out[l], w.in[(l ^ lane_mask) & 31], 8);
    wait();
    uint64_t out;
    memcpy(&out, w.out[t.lane], 8);
    return out;
}

// D (16 x 8) = A (16 x 16, bf16) B (16 x 8, bf16) + C (16 x 8, fp32), with the fragments of the
// PTX ISA ("Matrix Fragments for mma.m16n8k16" with .bf16): lane = 4 g + t holds
//   a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t, 2t+1], a[2] = A[g][2t+8, 2t+9], a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g]
//   c[0..1] = C[g][2t, 2t+1], c[2..3] = C[g+8][2t, 2t+1], and D alike,
// each 32-bit register holding the lower column (or row) index in its low half.
void mma_m16n8k16_bf16(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    Thread& t = *launch.current;
    Warp& w = launch.warps[t.warp];
    memcpy(w.in[t.lane], a, 16);
    memcpy(w.in[t.lane] + 4, b, 8);
    memcpy(w.in[t.lane] + 6, c, 16);
    if (arrive(Collective::mma, 0xffffffffu, 0)) {
        float A[16][16], B[16][8], C[16][8];
        auto lo = [](uint32_t r) { return __uint_as_float(r << 16); };
        auto hi = [](uint32_t r) { return __uint_as_float(r & 0xffff0000u); };
        for (int l = 0; l < 32; l++) {
            const int g = l / 4, t4 = l % 4;
            const uint32_t* in = w.in[l];
            for (int half = 0; half < 2; half++) {  // a[0], a[1]: columns 2t, 2t+1; a[2], a[3]: 2t+8, 2t+9
                A[g][2 * t4 + 8 * half] = lo(in[2 * half]);
                A[g][2 * t4 + 1 + 8 * half] = hi(in[2 * half]);
                A[g + 8][2 * t4 + 8 * half] = lo(in[2 * half + 1]);
                A[g + 8][2 * t4 + 1 + 8 * half] = hi(in[2 * half + 1]);
                B[2 * t4 + 8 * half][g] = lo(in[4 + half]);
                B[2 * t4 + 1 + 8 * half][g] = hi(in[4 + half]);
            }
            C[g][2 * t4] = __uint_as_float(in[6]);
            C[g][2 * t4 + 1] = __uint_as_float(in[7]);
            C[g + 8][2 * t4] = __uint_as_float(in[8]);
            C[g + 8][2 * t4 + 1] = __uint_as_float(in[9]);
        }
        float D[16][8];
        for (int i = 0; i < 16; i++)
            for (int j = 0; j < 8; j++) {
                float acc = C[i][j];
                for (int k = 0; k < 16; k++) acc += A[i][k] * B[k][j];
                D[i][j] = acc;
            }
        for (int l = 0; l < 32; l++) {
            const int g = l / 4, t4 = l % 4;
            const float d[4] = {D[g][2 * t4], D[g][2 * t4 + 1], D[g + 8][2 * t4], D[g + 8][2 * t4 + 1]};
            memcpy(w.out[l], d, 16);
        }
    }
    wait();
    memcpy(c, w.out[t.lane], 16);
}

}  // namespace emulated

// ------------------------------------------------------------------------------ the entry from Python

namespace {

bool check_launch(const emulated::KernelInfo& k, const unsigned grid[3], const unsigned block[3], size_t dynamic_shared,
                  int nargs, const int* sizes, const char* kinds, char* error, size_t error_size) {
    const unsigned long long threads = (unsigned long long)block[0] * block[1] * block[2];
    const char* problem = nullptr;
    char buf[256];
    if (nargs != k.nargs) {
        snprintf(buf, sizeof buf, "given %d arguments, takes %d", nargs, k.nargs);
        problem = buf;
    }
    for (int i = 0; problem == nullptr && i < nargs; i++)
        if (sizes[i] != k.sizes[i] || kinds[i] != k.kinds[i]) {
            snprintf(buf, sizeof buf, "argument %d is a %d-byte %s, the kernel takes a %d-byte %s", i, sizes[i],
                     kinds[i] == 'p' ? "pointer" : kinds[i] == 'f' ? "float" : "integer", k.sizes[i],
                     k.kinds[i] == 'p' ? "pointer" : k.kinds[i] == 'f' ? "float" : "integer");
            problem = buf;
        }
    if (problem == nullptr && (threads == 0 || threads > 1024 || block[2] > 64))
        problem = "a block of 1 to 1024 threads (z at most 64), as on the device";
    if (problem == nullptr && (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[0] > 0x7fffffffu ||
                               grid[1] > 65535 || grid[2] > 65535))
        problem = "a grid of 1 to 2^31 - 1 blocks in x, 1 to 65535 in y and z, as on the device";
    if (problem == nullptr && dynamic_shared != 0)
        problem = "dynamic shared memory, which no kernel uses and the emulated device does not provide";
    if (problem != nullptr) snprintf(error, error_size, "%s: launch refused: %s", k.name, problem);
    return problem == nullptr;
}

}  // namespace

// Run kernel `name` over the grid; 0 on success, else 1 with the reason in `error`.
extern "C" __attribute__((visibility("default"))) int emulated_launch(
    const char* name, const unsigned grid[3], const unsigned block[3], size_t dynamic_shared, int nargs, void** args,
    const int* sizes, const char* kinds, uint64_t seed, char* error, size_t error_size) {
    using namespace emulated;
    const KernelInfo* k = find_kernel(name);
    if (k == nullptr) {
        snprintf(error, error_size, "%s: no such kernel in this library", name);
        return 1;
    }
    if (!check_launch(*k, grid, block, dynamic_shared, nargs, sizes, kinds, error, error_size)) return 1;
    const int threads = int(block[0] * block[1] * block[2]);
    if (!reserve_stacks(threads)) {
        snprintf(error, error_size, "%s: no memory for %d thread stacks", name, threads);
        return 1;
    }
    launch.kernel = k;
    launch.args = args;
    launch.rng = seed;
    launch.error.clear();
    launch.threads.assign(threads, Thread());
    launch.unstarted.assign(threads, 0);
    launch.fibers.assign(threads, Fiber());  // at most one per thread, when every thread waits
    for (int i = 0; i < threads; i++) {
        Thread& t = launch.threads[i];
        t.idx = {i % block[0], i / block[0] % block[1], i / (block[0] * block[1])};
        t.warp = i / 32;
        t.lane = i % 32;
        launch.fibers[i].stack = stacks + i * (STACK_BYTES + GUARD_BYTES) + GUARD_BYTES;
    }
    launch.warps.assign((threads + 31) / 32, Warp());
    grid_dim = {grid[0], grid[1], grid[2]};
    block_dim = {block[0], block[1], block[2]};
    const unsigned long long blocks = (unsigned long long)grid[0] * grid[1] * grid[2];
    std::vector<unsigned long long> order(blocks);
    for (unsigned long long i = 0; i < blocks; i++) order[i] = i;
    shuffle(order);
    for (unsigned long long i : order) {
        run_block({unsigned(i % grid[0]), unsigned(i / grid[0] % grid[1]), unsigned(i / grid[0] / grid[1])});
        if (!launch.error.empty()) break;
    }
    if (launch.error.empty()) return 0;
    snprintf(error, error_size, "%s", launch.error.c_str());
    return 1;
}

// The kernels this library holds, comma-separated.
extern "C" __attribute__((visibility("default"))) const char* emulated_kernels() {
    static std::string names;
    names.clear();
    for (const emulated::KernelInfo* k : emulated::registry()) names += (names.empty() ? "" : ",") + std::string(k->name);
    return names.c_str();
}
