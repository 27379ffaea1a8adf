/* arm64 CPU features: NEON and its fp16 conversions are baseline ARMv8-A. */
#include <stdio.h>

#include "kernels.h"

unsigned pe_cpu_detect(char *names, size_t n) {
    snprintf(names, n, "neon fp16-conversion");
    return PE_CPU_NEON;
}
