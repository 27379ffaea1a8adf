#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <time.h>
#include <sys/mman.h>
#include <immintrin.h>
#include "kernels.h"
static double now(void){struct timespec t;clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static double wall(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static uint16_t f2h(float f){ return (uint16_t)_cvtss_sh(f, 0); }

static char *junk; static int cold;
static void flush(void){ for(size_t i=0;i<(64u<<20);i+=64) junk[i]++; }
int main(int argc, char **argv){
  cold = getenv("COLD") != NULL; junk = calloc(64u<<20, 1);
  int64_t n_in = atoi(argv[1]), n_out = atoi(argv[2]); const char *kn = argv[3]; int nth = atoi(argv[4]);
  int64_t G=(n_out+15)/16;
  uint16_t *w = malloc(2*n_in*n_out); srand(1);
  for (int64_t i=0;i<n_in*n_out;i++){ float u=(rand()/(float)RAND_MAX-0.5f)*0.04f; w[i]=f2h(u);}  
  uint16_t *v; uint8_t *p; /* 2 MiB aligned and huge pages, as numpy does for large arrays */
  if (posix_memalign((void **)&v, 2 << 20, 2*16*n_in*G) || posix_memalign((void **)&p, 2 << 20, 16*n_in*((G+1)/2))) return 1;
  madvise(v, 2*16*n_in*G, MADV_HUGEPAGE); madvise(p, 16*n_in*((G+1)/2), MADV_HUGEPAGE); float *st=malloc(4*16*n_in); int32_t *o=malloc(4*16*n_in);
  pe_build_f16(w,n_in,n_out,v,p,st,o);
  pe_buckets b={v,p,st,o,n_in,n_out,G,16*n_in};
  pe_packed *pk;
  float *xs=malloc(4*n_in*10), *y=malloc(4*n_out), *x=xs; /* 10 inputs: each timed call a new one, as in decoding */
  for (int64_t i=0;i<10*n_in;i++){ float g=(rand()/(float)RAND_MAX); xs[i]=(rand()/(float)RAND_MAX-0.5f)*(-logf(g+1e-6f)); }
  if (pe_use_kernel(kn) != PE_OK) { fprintf(stderr, "no kernel set %s here: %s\n", kn, pe_available_kernels()); return 1; }
  pe_set_num_threads(nth);
  if (pe_pack(&b,&pk) != PE_OK) return 1; /* the copy of the kernel set asked for */
  uint32_t *sc=malloc(4*(2*16*n_in+16)); pe_item *items=malloc(sizeof(pe_item)*(PE_CLASSES*n_in+1));
  double effs[]={1.0,0.75,0.5,0.35,0.25,0.1};
  for (int e=0;e<6;e++){ int64_t m=0,by=0; double best=1e9,bc=1e9;
    for(int it=0;it<10;it++){ x=xs+it*n_in; if(cold) flush(); double t0=wall(),c0=now(); pe_bucketmul(pk,&b,x,1,effs[e],y,&m,&by); double t=wall()-t0,c=now()-c0; if(t<best)best=t; if(c<bc)bc=c;}
    double bs=1e9; for(int it=0;it<10;it++){ x=xs+it*n_in; if(cold) flush(); if(cold) {memset(sc,0,4*(2*16*n_in+16)); memset(items,0,sizeof(pe_item)*n_in);} int64_t b8[PE_CLASSES],e8[PE_CLASSES],nr,mu; double t0=wall(); pk->set->select(pk,x,effs[e],nth,items,b8,e8,&nr,&mu,sc); double t=wall()-t0; if(t<bs)bs=t;}
    printf("%s th%d eff %.2f wall %.3f ms cpu %.3f ms  ns/w(cpu) %.3f  select %.3f ms\n",kn,nth,effs[e],best*1e3,bc*1e3,bc*1e9/(effs[e]*n_in*n_out),bs*1e3);
  }
  double best=1e9; for(int it=0;it<10;it++){x=xs+it*n_in; if(cold) flush(); double t0=wall(); pe_dense_f16(x,w,1,n_in,n_out,y); double t=wall()-t0; if(t<best)best=t;}
  printf("dense wall %.3f ms\n",best*1e3);
  return 0;
}
