/* A CPUID mask, loaded with LD_PRELOAD by benchmarks/cpu_tier.py: hides instruction-set bits from every
 * CPUID this process runs, so onnxruntime (MLAS), numpy, PyTorch and oneDNN select the kernels of a lesser
 * CPU while this CPU's cores run them.
 *
 * How: Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID, 0) turns each CPUID instruction into a SIGSEGV.
 * The handler runs the real CPUID with faulting briefly off, clears the bits named in EDGEDIFF_CPUID_HIDE and
 * steps over the instruction. The setting is per thread, inherited by threads and forks, and reset by execve,
 * where LD_PRELOAD applies it again. glibc's own string functions chose theirs before this library loads.
 *
 * EDGEDIFF_CPUID_HIDE: comma-separated NAME:LEAF.SUBLEAF.REGISTER.BIT, REGISTER 0-3 for eax, ebx, ecx, edx.
 * A mask that cannot be applied ends the process (exit 70): a benchmark must not run unmasked under a
 * masked label. Hand-written: no library offers this; Intel's SDE emulates whole instruction sets instead,
 * far slower, and is not free to ship.
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define MAX_BITS 64

static struct { unsigned leaf, subleaf, reg, bit; } hidden[MAX_BITS];
static int n_hidden;
static char hidden_names[1024];

/* The names of the bits this process hides ("" without a mask): read by runtime/cpu_features.py. */
const char *edgediff_cpuid_hidden(void) { return hidden_names; }

static long cpuid_faulting(int faulting) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, faulting ? 0 : 1); }

static void on_segv(int sig, siginfo_t *info, void *context) {
    (void)sig;
    (void)info;
    greg_t *r = ((ucontext_t *)context)->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    if (ip[0] != 0x0f || ip[1] != 0xa2) { /* a real fault: let it end the process as it would have */
        signal(SIGSEGV, SIG_DFL);
        return;
    }
    unsigned leaf = (unsigned)r[REG_RAX], subleaf = (unsigned)r[REG_RCX], regs[4];
    cpuid_faulting(0);
    __cpuid_count(leaf, subleaf, regs[0], regs[1], regs[2], regs[3]);
    cpuid_faulting(1);
    for (int i = 0; i < n_hidden; i++)
        if (hidden[i].leaf == leaf && hidden[i].subleaf == subleaf) regs[hidden[i].reg] &= ~(1u << hidden[i].bit);
    r[REG_RAX] = regs[0];
    r[REG_RBX] = regs[1];
    r[REG_RCX] = regs[2];
    r[REG_RDX] = regs[3];
    r[REG_RIP] += 2; /* CPUID is two bytes long */
}

static void fail(const char *why) {
    fprintf(stderr, "edgediff cpuid_mask: %s\n", why);
    _exit(70);
}

__attribute__((constructor)) static void apply(void) {
    const char *spec = getenv("EDGEDIFF_CPUID_HIDE");
    if (!spec || !*spec) return;
    char copy[2048];
    if (strlen(spec) >= sizeof copy) fail("EDGEDIFF_CPUID_HIDE is too long");
    strcpy(copy, spec);
    for (char *save = NULL, *item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        char name[64];
        unsigned leaf, subleaf, reg, bit;
        if (n_hidden == MAX_BITS) fail("EDGEDIFF_CPUID_HIDE names too many bits");
        if (sscanf(item, "%63[^:]:%u.%u.%u.%u", name, &leaf, &subleaf, &reg, &bit) != 5 || reg > 3 || bit > 31)
            fail("EDGEDIFF_CPUID_HIDE: each item is NAME:LEAF.SUBLEAF.REGISTER.BIT");
        hidden[n_hidden].leaf = leaf;
        hidden[n_hidden].subleaf = subleaf;
        hidden[n_hidden].reg = reg;
        hidden[n_hidden].bit = bit;
        n_hidden++;
        if (strlen(hidden_names) + strlen(name) + 2 > sizeof hidden_names) fail("EDGEDIFF_CPUID_HIDE is too long");
        if (*hidden_names) strcat(hidden_names, ",");
        strcat(hidden_names, name);
    }
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    if (sigaction(SIGSEGV, &action, NULL) != 0) fail("cannot install the SIGSEGV handler");
    if (cpuid_faulting(1) != 0) fail("this CPU or kernel offers no CPUID faulting (no cpuid_fault in /proc/cpuinfo)");
}
