// Runtime CPU dispatch without -march=native: the compiler emits an AVX-512, an AVX2 and a
// baseline copy of each hot loop and the loader picks one per CPU (GNU ifunc), so one wheel
// runs everywhere and still uses the wide vectors torch's own fused AdamW uses.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && defined(__has_attribute)
#if __has_attribute(target_clones) && !defined(FREEZEGUARD_NO_CLONES)
#define FG_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#endif
#ifndef FG_CLONES
#define FG_CLONES
#endif
